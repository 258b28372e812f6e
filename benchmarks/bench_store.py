"""Store speed next to the plain-file baseline, in one run.

- write: `ActivationStore.put(encode_record(...))` for N records (encoding and its checksum
  included, final sync included) ÷ appending the same record bytes to one file with a final
  fsync; and the same store write without the checksum. Each round runs the three (order
  alternating, fresh files); the ratios are taken within a round, then the median over rounds
  (this machine's disk speed drifts between rounds far more than within one). Records over
  32 MiB are written twice: in this process and in a child started with malloc's huge pages
  (`hallulens_capture.hugepages`; the two sides of each ratio in the same process);
- checksum: CRC-32 (what older records carry) and XXH3-64 (what the writer writes) over one
  record's activations, GB/s, run side by side;
- slice read: layer 20 x the first 64 tokens of every record through the store ÷ the same read
  from one numpy memmap [N, layers, tokens, hidden]: record by record (`store[key].slice`), and
  with `read_many` on a store opened for the read and on one already open (its snapshot's record
  layouts known); warm (page cache) and cold (pages dropped with posix_fadvise before each read,
  no root needed);
- shards: the same reads from the same records written into four shards ÷ from one environment.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import xxhash
from common import huge_pages_enabled, run_case, run_with_huge_pages, save, side_by_side, table

from hallulens_capture import open_store, record_key
from hallulens_capture.record import encode_record
from hallulens_capture.store import ActivationStore

LAYER, TOKENS = 20, 64


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


def write_case(tmp: Path, n: int, shape: tuple[int, int, int], rounds: int) -> dict[str, object]:
    """Store (with and without checksums) and raw file in each round, order alternating."""
    items = list(records(n, *shape))  # made before any timing (random data takes a while)
    values = [bytes(encode_record(a, "F16", i, m)) for _, a, i, m in items[:8]]
    total = sum(len(values[j % len(values)]) for j in range(n))

    def store_write(path: Path, checksum: bool = True) -> None:
        scratch = bytearray(len(values[0]) + 4096)  # one reused buffer, as CaptureSession does
        with ActivationStore(path, writable=True) as store:  # close() syncs
            for key, acts, index, meta in items:
                store.put(key, encode_record(acts, "F16", index, meta, scratch, checksum=checksum))

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
    for round_ in range(rounds):
        for name in list(writers) if round_ % 2 == 0 else list(writers)[::-1]:
            path = tmp / f"w-{name}"
            os.sync()  # start each run with no dirty pages left by the one before
            t0 = time.perf_counter()
            writers[name](path)
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    pairs = list(zip(times["store"], times["no_checksum"], times["raw"], strict=True))
    return {
        "huge_pages": huge_pages_enabled(),
        "records": n,
        "shape": list(shape),
        "bytes": total,
        "rounds": rounds,
        "store_gb_s": total / statistics.median(times["store"]) / 1e9,
        "raw_gb_s": total / statistics.median(times["raw"]) / 1e9,
        "ratio": statistics.median(raw / store for store, _, raw in pairs),  # store ÷ raw
        "no_checksum_gb_s": total / statistics.median(times["no_checksum"]) / 1e9,
        "checksum_ratio": statistics.median(plain / store for store, plain, _ in pairs),
    }


def write_case_in_tmp(n: int, shape: list[int], rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        return write_case(Path(tmp), n, tuple(shape), rounds)


def checksum_case(shape: tuple[int, int, int], repeats: int = 15) -> dict[str, object]:
    """GB/s of the old and the new record checksum over one record's activations, alternately."""
    data = next(records(1, *shape))[1]
    t_crc, t_xxh = side_by_side(lambda: zlib.crc32(data), lambda: xxhash.xxh3_64(data), repeats)
    return {
        "shape": list(shape),
        "bytes": data.nbytes,
        "crc32_gb_s": data.nbytes / t_crc / 1e9,
        "xxh3_gb_s": data.nbytes / t_xxh / 1e9,
    }


def fill(path: Path, items, shards: int = 0) -> list[str]:
    """Write `items` into one environment, or spread over `shards` shards (as ranks do)."""
    keys = []
    stores = [ActivationStore(path, writable=True, shard=f"rank{r}") for r in range(shards)]
    stores = stores or [ActivationStore(path, writable=True)]
    for i, (key, acts, index, meta) in enumerate(items):
        stores[i % len(stores)].put(key, encode_record(acts, "F16", index, meta))
        keys.append(key)
    for store in stores:
        store.close()
    return keys


def readers(path: Path, keys: list[str]) -> dict[str, object]:
    """The ways to read layer LAYER x the first TOKENS tokens of every record of a store, each
    opening the store for the read."""

    def per_record() -> np.ndarray:
        with open_store(path) as store:
            return np.stack([store[k].slice(layers=[LAYER], tokens=slice(0, TOKENS)) for k in keys])

    def many() -> np.ndarray:
        with open_store(path) as store:
            return store.read_many(keys, layers=LAYER, tokens=slice(0, TOKENS))

    return {"per_record": per_record, "read_many": many}


def timed_min(fns: dict, cold: dict[str, Path], repeats: int = 3) -> dict[str, float]:
    """Best of `repeats` of each function, in turn (pages of `cold[name]` dropped first)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats):
        for name in list(fns) if round_ % 2 == 0 else list(fns)[::-1]:
            if name in cold:
                drop_cache(cold[name])
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: min(values) for name, values in times.items()}


def read_case(tmp: Path, n: int, shape: tuple[int, int, int]) -> dict[str, object]:
    store_path, mm_path = tmp / "r.lmdb", tmp / "r.npy"
    memmap = np.lib.format.open_memmap(mm_path, mode="w+", dtype=np.float16, shape=(n, *shape))
    items = list(records(n, *shape))
    for i, (_, acts, _, _) in enumerate(items):
        memmap[i] = acts
    memmap.flush()
    del memmap
    keys = fill(store_path, items)
    fns = readers(store_path, keys)
    fns["memmap"] = lambda: np.load(mm_path, mmap_mode="r")[:, LAYER, :TOKENS].copy()
    expected = fns["memmap"]()
    for name, fn in fns.items():
        got = fn()
        assert np.array_equal(got.reshape(expected.shape), expected), f"{name} disagrees"
    result: dict[str, object] = {"records": n, "shape": list(shape), "layer": LAYER}
    result["tokens"] = TOKENS
    cold = {"memmap": mm_path, "per_record": store_path, "read_many": store_path}
    best = timed_min(fns, cold)  # nothing holds the files mapped: their pages can go
    for name, seconds in best.items():
        result[f"cold_{name}_ms"] = seconds * 1000
        result[f"cold_{name}_ratio"] = seconds / best["memmap"]
    with open_store(store_path) as opened:  # warm, also from a store and a memmap kept open
        mapped = np.load(mm_path, mmap_mode="r")
        fns["read_many_open"] = lambda: opened.read_many(
            keys, layers=LAYER, tokens=slice(0, TOKENS)
        )
        fns["memmap_open"] = lambda: mapped[:, LAYER, :TOKENS].copy()
        warm = timed_min(fns, {}, repeats=5)
        for name, seconds in warm.items():
            result[f"warm_{name}_ms"] = seconds * 1000
            result[f"warm_{name}_ratio"] = seconds / warm[_baseline(name)]
    return result


def _baseline(way: str) -> str:
    """The memmap read a store read is compared with: opened for the read, or kept open."""
    return "memmap_open" if way.endswith("_open") else "memmap"


def shard_case(tmp: Path, n: int, shape: tuple[int, int, int]) -> dict[str, object]:
    """The same reads from one environment and from four shards (warm), alternately."""
    items = list(records(n, *shape))
    paths = {"one": tmp / "one.lmdb", "sharded": tmp / "sharded.lmdb"}
    keys = fill(paths["one"], items)
    assert fill(paths["sharded"], items, shards=4) == keys
    result: dict[str, object] = {"records": n, "shape": list(shape), "shards": 4}
    one, sharded = readers(paths["one"], keys), readers(paths["sharded"], keys)
    for name in one:
        assert np.array_equal(one[name](), sharded[name]())
        t_one, t_sharded = side_by_side(one[name], sharded[name], 9)
        result[f"{name}_one_ms"] = t_one * 1000
        result[f"{name}_sharded_ms"] = t_sharded * 1000
        result[f"{name}_ratio"] = t_sharded / t_one
    return result


def run(quick: bool = False) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        n_big, rounds = (4, 5) if quick else (8, 9)
        writes = [
            # SmolLM2: 31 layers x 128 tokens x 576 (4.6 MB); Llama-3.1-8B: 33 x 64 x 4096 (17 MB)
            # and 33 x 256 x 4096 (69 MB: over glibc's 32 MiB mmap threshold, LMDB's page buffer
            # for the value is then mapped afresh in every transaction)
            write_case(tmp, 32 if quick else 100, (31, 128, 576), 5 if quick else 9),
            write_case(tmp, 12 if quick else 30, (33, 64, 4096), 5 if quick else 9),
            write_case(tmp, n_big, (33, 256, 4096), rounds),
            run_with_huge_pages(__file__, "write", n=n_big, shape=[33, 256, 4096], rounds=rounds),
        ]
        read = read_case(tmp, 100 if quick else 400, (31, 96, 576))
        shards = shard_case(tmp, 100 if quick else 400, (31, 96, 576))
    return {
        "write": writes,
        "read": read,
        "shards": shards,
        "checksum": checksum_case((31, 128, 576)),
    }


def shape_text(shape: list[int]) -> str:
    return "x".join(map(str, shape))


if __name__ == "__main__":
    if run_case({"write": write_case_in_tmp}):
        sys.exit()
    result = run("--quick" in sys.argv)
    writes = result["write"]
    print(
        table(
            "store write (encode + checksum + put + final sync) ÷ raw sequential file write of the "
            "same bytes (median of the ratios within each round)",
            [
                *["records", "record shape", "malloc huge pages", "MB", "rounds"],
                *["store GB/s", "raw GB/s", "store ÷ raw"],
            ],
            [
                [
                    w["records"],
                    shape_text(w["shape"]),
                    "yes" if w["huge_pages"] else "no",
                    round(w["bytes"] / 1e6),
                    w["rounds"],
                    w["store_gb_s"],
                    w["raw_gb_s"],
                    w["ratio"],
                ]
                for w in writes
            ],
        )
    )
    print(
        table(
            "store write with the record checksum (XXH3) ÷ without it (throughput)",
            ["records", "record shape", "with GB/s", "without GB/s", "with ÷ without"],
            [
                [
                    w["records"],
                    shape_text(w["shape"]),
                    w["store_gb_s"],
                    w["no_checksum_gb_s"],
                    w["checksum_ratio"],
                ]
                for w in writes
            ],
        )
    )
    c = result["checksum"]
    print(
        table(
            f"checksum speed over one record's activations ({shape_text(c['shape'])}, "
            f"{c['bytes'] / 1e6:.1f} MB)",
            ["hash", "GB/s"],
            [["crc32 (older records)", c["crc32_gb_s"]], ["xxh3-64 (written)", c["xxh3_gb_s"]]],
        )
    )
    r = result["read"]
    ways = ("per_record", "read_many", "read_many_open")
    print(
        table(
            f"slice read: layer {r['layer']} x {r['tokens']} tokens over {r['records']} records "
            f"({shape_text(r['shape'])}): ms, and ÷ the memmap read (`_open`: store and memmap "
            "opened before, the store's record layouts known)",
            ["cache", "way", "store ms", "memmap ms", "store ÷ memmap"],
            [
                [m, w, r[f"{m}_{w}_ms"], r[f"{m}_{_baseline(w)}_ms"], r[f"{m}_{w}_ratio"]]
                for m in ("cold", "warm")
                for w in ways
                if f"{m}_{w}_ms" in r
            ],
        )
    )
    sh = result["shards"]
    print(
        table(
            f"the same reads (warm) from {sh['shards']} shards ÷ from one environment "
            f"({sh['records']} records {shape_text(sh['shape'])})",
            ["read", "one env ms", "sharded ms", "sharded ÷ one"],
            [
                [w, sh[f"{w}_one_ms"], sh[f"{w}_sharded_ms"], sh[f"{w}_ratio"]]
                for w in ("per_record", "read_many")
            ],
        )
    )
    print("wrote", save("store", result))
