"""A model's text config and weight files, checked before its weights load, so bad capture
options and missing files fail in a second."""

from __future__ import annotations

import os
from pathlib import Path

import transformers

from hallulens_capture.errors import ModelFilesError


def text_config(pretrained: str | transformers.PreTrainedModel, kwargs: dict):
    """The decoder's config (`num_hidden_layers`, `hidden_size`) of a path, hub id or model."""
    if isinstance(pretrained, transformers.PreTrainedModel):
        return pretrained.config.get_text_config()
    try:
        config = transformers.AutoConfig.from_pretrained(
            pretrained,
            revision=kwargs.get("revision") or "main",
            trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
            subfolder=kwargs.get("subfolder") or "",
            gguf_file=kwargs.get("gguf_file"),
        )
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFilesError(
            f"pretrained={pretrained}: cannot read the model config: {reason}"
        ) from None
    return config.get_text_config()


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack")


def check_local_weights(pretrained: object, kwargs: dict) -> None:
    """A local model directory without weight files fails here, in one line, not in a
    loader's traceback after the config and tokenizer were read."""
    if not isinstance(pretrained, str) or not os.path.isdir(pretrained):
        return
    folder = Path(pretrained, kwargs.get("subfolder") or "")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ModelFilesError(
            f"pretrained={pretrained}: no weight files in {folder} "
            f"({', '.join(WEIGHT_FILES)}); copy the model's weights there"
        )
