"""HF capture on a GPU: a Llama-3.1-8B-sized model with random weights, with ÷ without capture.

Run by hand on a CUDA machine (not part of `make bench`): the model is built from its config (no
weights, no hub), the tokenizer comes from a local directory (`--tokenizer`; SmolLM2's does, the
model's larger vocabulary only yields ids that decode to nothing). Greedy, exactly
`--new-tokens` new tokens per prompt, float16 storage of the generated tokens, token statistics
on (`capture_topk` default). Each round runs the plain backend, all 33 layer outputs with each
of `--writers` writer threads, and 4 layers, in a rotating order, after one untimed round (CUDA
kernels, the pinned-memory cache); every capture call writes fresh records to a store on local
disk. Cells of one batch per `generate_until` call show the whole tail (the last batch's records
are written before the call returns); the `--per-call` cell runs several batches in one call, as
a task does, where the writer stores one batch while the engine runs the next. Beside the wall
times: how long `model.generate` itself ran inside the capturing call (the rest is the tail:
rows assembled on the host and written), and the disk's share: writing the bytes one call added
to its store as a plain synced file, ÷ the call without capture.

    python benchmarks/bench_capture_gpu.py --tokenizer DIR --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from bench_capture import requests
from common import machine, numbers, table

from hallulens_models.hf_lm import HalluLensHFLM

LLAMA_3_1_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {
    **LLAMA_3_1_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def variants(n_layers: int, writers: list[int]) -> dict[str, tuple[str, int] | None]:
    """Backends by name: (capture_layers, writer threads), None for the plain one; all layers
    with each of `writers`, 4 layers spread evenly with the first."""
    four = f"0,{n_layers // 3},{2 * n_layers // 3},{n_layers}"
    named: dict[str, tuple[str, int] | None] = {"plain": None}
    for count in writers:
        named["all" if count == 1 else f"all, {count} writers"] = ("all", count)
    named["4 layers"] = (four, writers[0])
    return named


def backend(model, tokenizer, batch: int, folder: str, name: str, capture) -> HalluLensHFLM:
    """The plain backend (`capture` None) or one capturing into `folder/name`; the writer count
    is read when the capture session opens, with the backend."""
    if capture is None:
        return HalluLensHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
    layers, writers = capture
    os.environ["HALLULENS_CAPTURE_WRITERS"] = str(writers)
    try:
        return HalluLensHFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch,
            activations=f"{folder}/{name}",
            capture_layers=layers,
        )
    finally:
        del os.environ["HALLULENS_CAPTURE_WRITERS"]


def build_model(shape: dict, device: str) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(**shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class TimedGenerate:
    """Wraps `model.generate` to add up the seconds it runs (synchronized on CUDA)."""

    def __init__(self, model: transformers.PreTrainedModel) -> None:
        self.inner = model.generate
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def stored_bytes(folder: str) -> int:
    """Bytes on disk of a store, its shards included (HALLULENS_CAPTURE_WRITERS > 1 makes some)."""
    return sum(p.stat().st_blocks * 512 for p in Path(folder).glob("**/*.mdb"))


def plain_write_seconds(folder: str, size: int) -> float:
    """Appending `size` bytes to a new plain file in `folder`, synced: the disk's own time."""
    chunk = os.urandom(1 << 20) * 64
    path = os.path.join(folder, "plain.bin")
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(memoryview(chunk)[: min(left, len(chunk))])
        f.flush()
        os.fdatasync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def measure(
    cell: dict, model, tokenizer, folder: str, new_tokens: int, rounds: int, deadline: float
) -> list[dict]:
    """One cell: `cell["variants"]` (name -> capture_layers, None plain) at one batch size,
    `cell["per_call"]` batches per generate_until call, rounds in a rotating order."""
    batch, per_call, named = cell["batch"], cell["per_call"], cell["variants"]
    timer = model.generate
    backends = {
        name: backend(model, tokenizer, batch, folder, name, capture)
        for name, capture in named.items()
    }
    times, inside, added = {n: [] for n in named}, {n: [] for n in named}, {}
    for round_ in range(rounds + (1 if cell["warm"] else 0)):
        timed = round_ or not cell["warm"]
        if timed and times["plain"] and time.perf_counter() > deadline:
            print(f"budget reached: {cell['name']} after {len(times['plain'])} rounds", flush=True)
            break
        if times["plain"] and shutil.disk_usage(folder).free < 1.5 * sum(added.values()):
            # a round's stores stay until the cell ends (an 8B model's 3-batch cell adds 26 GB)
            print(f"disk nearly full: {cell['name']} after {len(times['plain'])} rounds")
            break
        names = list(named)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            before = stored_bytes(f"{folder}/{name}") if named[name] else 0
            calls = requests(batch * per_call, new_tokens, f"{cell['name']}{round_}-")
            timer.seconds = 0.0
            start = time.perf_counter()
            backends[name].generate_until(calls)
            seconds = time.perf_counter() - start
            if timed:
                times[name].append(seconds)
                inside[name].append(timer.seconds)
            if named[name]:
                added[name] = stored_bytes(f"{folder}/{name}") - before
            print(
                f"{cell['name']} round {round_} {name}: {seconds:.2f} s "
                f"(generate {timer.seconds:.2f} s)",
                flush=True,
            )
    plain = statistics.median(times["plain"])
    rows = []
    for name in [n for n in named if named[n]]:
        disk = plain_write_seconds(folder, added[name])
        rows.append(
            {
                "layers": name,
                "writers": named[name][1],
                "batch": batch,
                "batches_per_call": per_call,
                "rounds": len(times[name]),
                "without_s": plain,
                "with_s": statistics.median(times[name]),
                "generate_in_with_s": statistics.median(inside[name]),
                "ratio": statistics.median(times[name]) / plain,
                "bytes_per_call": added[name],
                "disk_share": (plain + disk) / plain,
                "times": times[name],
                "plain_times": times["plain"],
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", default="capture_hf_gpu.json")
    parser.add_argument("--store-dir", default=None, help="where the stores go (local disk)")
    parser.add_argument("--batches", default="64,16", help="the first also runs --per-call")
    parser.add_argument("--per-call", type=int, default=3, help="batches per call, last cell")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=1e9, help="no round starts after this")
    parser.add_argument("--writers", default="1,4", help="writer threads, all-layer variants")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer model (smoke test)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(TINY if args.tiny else LLAMA_3_1_8B, device)
    model.generate = TimedGenerate(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    writers = numbers(args.writers)
    named = variants(model.config.num_hidden_layers, writers)
    first, *rest = numbers(args.batches)
    cells = [{"name": f"b{first}", "batch": first, "per_call": 1, "variants": named, "warm": True}]
    if args.per_call > 1:
        cells.append({"name": f"b{first}x{args.per_call}", "batch": first,
                      "per_call": args.per_call,
                      "variants": {k: v for k, v in named.items() if "layers" not in k},
                      "warm": False})  # fmt: skip
    cells += [{"name": f"b{b}", "batch": b, "per_call": 1, "variants": named, "warm": True}
              for b in rest]  # fmt: skip
    result = {
        "machine": machine(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "tiny" if args.tiny else "Llama-3.1-8B-sized, random weights, bfloat16",
        "new_tokens": args.new_tokens,
        "storage": "float16",
        "tokens": "generated",
        "setup_s": time.perf_counter() - started,
        "rows": [],
    }
    for cell in cells:
        with tempfile.TemporaryDirectory(dir=args.store_dir) as folder:
            deadline = started + args.budget
            result["rows"] += measure(
                cell, model, tokenizer, folder, args.new_tokens, args.rounds, deadline
            )
        if device == "cuda":
            result.setdefault("host_memory", {})[cell["name"]] = {
                k: v for k, v in torch.cuda.host_memory_stats().items() if "count" in k
            }
        Path(args.out).write_text(json.dumps(result, indent=2))
        gc.collect()
    print(
        table(
            f"HF capture on {result['device']} ({result['model']}, {args.new_tokens} new tokens)",
            [
                "layers",
                "batch",
                "batches/call",
                "without s",
                "with s",
                "generate s",
                "ratio",
                "GB/call",
                "disk ÷",
            ],
            [
                [
                    r["layers"],
                    r["batch"],
                    r["batches_per_call"],
                    r["without_s"],
                    r["with_s"],
                    r["generate_in_with_s"],
                    r["ratio"],
                    r["bytes_per_call"] / 1e9,
                    r["disk_share"],
                ]
                for r in result["rows"]
            ],
        )
    )
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
