"""Store speed next to the plain-file baseline, in one run.

- write: `ActivationStore.put(encode_record(...))` for N records (encoding included, final sync
  included) ÷ appending the same record bytes to one file with a final fsync; and the same store
  write with the record checksum ÷ without it (what keeping the checksum on costs);
- checksum: CRC-32 (the one records use) and BLAKE2b over one record's activations, GB/s, run
  side by side (why CRC-32);
- slice read: layer 20 x the first 64 tokens of every record, through `open_store` ÷ the same
  read from one numpy memmap [N, layers, tokens, hidden]; warm (page cache) and cold (pages
  dropped with posix_fadvise before each read, no root needed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from common import save, side_by_side, table

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
    """Store (with and without checksums) and raw file, each order of the three once and then
    reversed, three times (fresh files, medians of six)."""
    values = [encode_record(a, "F16", i, m) for _, a, i, m in records(min(n, 8), *shape)]
    total = sum(len(values[j % len(values)]) for j in range(n))

    def store_write(path: Path, checksum: bool = True) -> None:
        scratch = bytearray(len(values[0]) + 4096)  # one reused buffer, as CaptureSession does
        with ActivationStore(path, writable=True) as store:  # close() syncs
            for key, acts, index, meta in records(n, *shape):
                store.put(key, encode_record(acts, "F16", index, meta, scratch, checksum))

    def raw_write(path: Path) -> None:
        with open(path, "wb") as f:
            for j in range(n):
                f.write(values[j % len(values)])
            f.flush()
            os.fsync(f.fileno())

    writers = {
        "store": store_write,
        "no_checksum": lambda path: store_write(path, checksum=False),
        "raw": raw_write,
    }
    times: dict[str, list[float]] = {name: [] for name in writers}
    order = ("store", "no_checksum", "raw", "raw", "no_checksum", "store")
    for round_, name in enumerate(order * 3):
        path = tmp / f"w{round_}"
        os.sync()  # start each run with no dirty pages left by the one before
        t0 = time.perf_counter()
        writers[name](path)
        times[name].append(time.perf_counter() - t0)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    t_store, t_plain, t_raw = (statistics.median(times[k]) for k in writers)
    return {
        "records": n,
        "shape": list(shape),
        "bytes": total,
        "store_gb_s": total / t_store / 1e9,
        "raw_gb_s": total / t_raw / 1e9,
        "ratio": t_raw / t_store,  # throughput ratio: store ÷ raw
        "no_checksum_gb_s": total / t_plain / 1e9,
        "checksum_ratio": t_plain / t_store,  # throughput with ÷ without the checksum
    }


def checksum_case(shape: tuple[int, int, int], repeats: int = 15) -> dict[str, object]:
    """GB/s of the two candidate hashes over one record's activations, run alternately."""
    data = next(records(1, *shape))[1].tobytes()
    t_crc, t_blake = side_by_side(
        lambda: zlib.crc32(data), lambda: hashlib.blake2b(data, digest_size=8), repeats
    )
    return {
        "shape": list(shape),
        "bytes": len(data),
        "crc32_gb_s": len(data) / t_crc / 1e9,
        "blake2b_gb_s": len(data) / t_blake / 1e9,
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
    return {"write": writes, "read": read, "checksum": checksum_case((31, 128, 576))}


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
    print(
        table(
            "store write with the record checksum ÷ without it (throughput)",
            ["records", "record shape", "with GB/s", "without GB/s", "with ÷ without"],
            [
                [
                    w["records"],
                    "x".join(map(str, w["shape"])),
                    w["store_gb_s"],
                    w["no_checksum_gb_s"],
                    w["checksum_ratio"],
                ]
                for w in result["write"]
            ],
        )
    )
    c = result["checksum"]
    print(
        table(
            f"checksum speed over one record's activations ({'x'.join(map(str, c['shape']))}, "
            f"{c['bytes'] / 1e6:.1f} MB)",
            ["hash", "GB/s"],
            [["crc32 (used)", c["crc32_gb_s"]], ["blake2b-64", c["blake2b_gb_s"]]],
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
