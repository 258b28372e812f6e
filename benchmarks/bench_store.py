"""Store speed next to the plain-file baseline, in one run.

- write: `ActivationStore.put(encode_record(...))` for N records (encoding included, final sync
  included) ÷ appending the same record bytes to one file with a final fsync;
- slice read: layer 20 x the first 64 tokens of every record, through `open_store` ÷ the same
  read from one numpy memmap [N, layers, tokens, hidden]; warm (page cache) and cold (pages
  dropped with posix_fadvise before each read, no root needed).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save, table

from hallulens_capture import open_store, record_key
from hallulens_capture.record import encode_record
from hallulens_capture.store import ActivationStore

INDEX = ("layer_ids", "token_positions", "prompt_token_ids", "generated_token_ids")


def records(n: int, layers: int, tokens: int, hidden: int):
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((layers, tokens, hidden)).astype(np.float16)
    for i in range(n):
        prompt = f"benchmark prompt {i}"
        index = {
            "layer_ids": np.arange(layers),
            "token_positions": np.arange(tokens) + 8,
            "prompt_token_ids": np.arange(8),
            "generated_token_ids": np.arange(tokens + 1),
        }
        meta = {
            "prompt": prompt,
            "response": "r",
            "model": "bench",
            "capture_tokens": "generated",
            "dtype": "float16",
            "backend": "bench",
            "timestamp": "t",
        }
        acts[:, 0, 0] = i  # distinct content per record
        yield record_key(prompt), acts, index, meta


def drop_cache(path: Path) -> None:
    for file in [path] if path.is_file() else path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(file, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_case(tmp: Path, n: int, shape: tuple[int, int, int]) -> dict[str, object]:
    """Store and raw file, order store, raw, raw, store three times (fresh files, medians)."""
    values = [encode_record(a, "F16", i, m) for _, a, i, m in records(min(n, 8), *shape)]
    total = sum(len(values[j % len(values)]) for j in range(n))

    def store_write(path: Path) -> None:
        scratch = bytearray(len(values[0]) + 4096)  # one reused buffer, as CaptureSession does
        with ActivationStore(path, writable=True) as store:  # close() syncs
            for key, acts, index, meta in records(n, *shape):
                store.put(key, encode_record(acts, "F16", index, meta, scratch))

    def raw_write(path: Path) -> None:
        with open(path, "wb") as f:
            for j in range(n):
                f.write(values[j % len(values)])
            f.flush()
            os.fsync(f.fileno())

    times: dict[str, list[float]] = {"store": [], "raw": []}
    for round_, name in enumerate(("store", "raw", "raw", "store") * 3):
        path = tmp / f"w{round_}"
        os.sync()  # start each run with no dirty pages left by the one before
        t0 = time.perf_counter()
        (store_write if name == "store" else raw_write)(path)
        times[name].append(time.perf_counter() - t0)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    t_store, t_raw = (statistics.median(times[k]) for k in ("store", "raw"))
    return {
        "records": n,
        "shape": list(shape),
        "bytes": total,
        "store_gb_s": total / t_store / 1e9,
        "raw_gb_s": total / t_raw / 1e9,
        "ratio": t_raw / t_store,  # throughput ratio: store ÷ raw
    }


def read_case(tmp: Path, n: int, shape: tuple[int, int, int], layer: int = 20, tokens: int = 64):
    store_path, mm_path = tmp / "r.lmdb", tmp / "r.npy"
    hidden = shape[2]
    memmap = np.lib.format.open_memmap(mm_path, mode="w+", dtype=np.float16, shape=(n, *shape))
    keys = []
    with ActivationStore(store_path, writable=True) as store:
        for i, (key, acts, index, meta) in enumerate(records(n, *shape)):
            store.put(key, encode_record(acts, "F16", index, meta))
            memmap[i] = acts
            keys.append(key)
    memmap.flush()
    del memmap
    out = np.empty((n, tokens, hidden), dtype=np.float16)

    def from_store():
        with open_store(store_path) as store:
            for i, key in enumerate(keys):
                out[i] = store[key].slice(layers=[layer], tokens=slice(0, tokens))[0]
        return out[:, 0, 0].copy()

    def from_memmap():
        mm = np.load(mm_path, mmap_mode="r")
        out[:] = mm[:, layer, :tokens]
        return out[:, 0, 0].copy()

    result = {"records": n, "shape": list(shape), "layer": layer, "tokens": tokens}
    for mode in ("cold", "warm"):
        times = {"store": [], "memmap": []}
        for _ in range(3):
            for name, fn, path in (
                ("store", from_store, store_path),
                ("memmap", from_memmap, mm_path),
            ):
                if mode == "cold":
                    drop_cache(path)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        assert np.array_equal(from_store(), from_memmap()), "the two reads disagree"
        best = {k: min(v) for k, v in times.items()}
        result[f"{mode}_store_ms"] = best["store"] * 1000
        result[f"{mode}_memmap_ms"] = best["memmap"] * 1000
        result[f"{mode}_ratio"] = best["store"] / best["memmap"]
    return result


def run(quick: bool = False) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        writes = [
            # SmolLM2: 31 layers x 128 tokens x 576 (4.6 MB); Llama-3.1-8B: 33 x 64 x 4096 (17 MB)
            write_case(tmp, 64 if quick else 200, (31, 128, 576)),
            write_case(tmp, 16 if quick else 60, (33, 64, 4096)),
        ]
        read = read_case(tmp, 100 if quick else 400, (31, 96, 576))
    return {"write": writes, "read": read}


if __name__ == "__main__":
    result = run("--quick" in sys.argv)
    print(
        table(
            "store write (encode + put + final sync) ÷ raw sequential file write of the same bytes",
            ["records", "record shape", "MB", "store GB/s", "raw GB/s", "store ÷ raw"],
            [
                [
                    w["records"],
                    "x".join(map(str, w["shape"])),
                    round(w["bytes"] / 1e6),
                    w["store_gb_s"],
                    w["raw_gb_s"],
                    w["ratio"],
                ]
                for w in result["write"]
            ],
        )
    )
    r = result["read"]
    print(
        table(
            f"slice read: layer {r['layer']} x {r['tokens']} tokens over {r['records']} records "
            f"({'x'.join(map(str, r['shape']))})",
            ["cache", "store ms", "memmap ms", "store ÷ memmap"],
            [
                [m, r[f"{m}_store_ms"], r[f"{m}_memmap_ms"], r[f"{m}_ratio"]]
                for m in ("cold", "warm")
            ],
        )
    )
    print("wrote", save("store", result))
