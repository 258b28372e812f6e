"""Analysis speed and memory next to plain-file baselines, in one run.

- export: `export_npy` of window:16 over all 33 layers (output bytes = the records' bytes) ÷
  writing the same bytes from memory to one file, both ending with fsync (alternated, each
  after `sync`, medians of 6);
- layer read: one layer of the npy export for all rows through `NpyExport.read_layers` ÷ the
  same read of a plain memmap (`np.load(mmap_mode="r")[:, layer]`), cold and warm;
- memory: peak RSS of export processes over N and 2N records (the same peak = bounded);
- probe: 10k samples x 33 layers x hidden 4096 float16 (a store of one fed token per record,
  exported and probed with 5 grouped folds and 1000 bootstrap replicates): wall time.
`--quick` shrinks every case for a smoke run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_store import drop_cache
from common import save, table

from hallulens_analysis import (
    NpyExport,
    ProbeSettings,
    Selection,
    build_plan,
    export_npy,
    features,
    run_probe,
)
from hallulens_capture import open_store, record_key
from hallulens_capture.positions import token_positions
from hallulens_capture.record import encode_record
from hallulens_capture.store import ActivationStore

LAYERS = 33


def write_store(path: Path, n: int, generated: int, hidden: int, signal_layer: int = 20) -> None:
    """n records of scope `generated` (generated - 1 fed tokens), two per question, labelled;
    at `signal_layer` the states move along one direction by the label (a probe finds it)."""
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(hidden).astype(np.float32)
    direction /= np.linalg.norm(direction)
    positions = token_positions("generated", 8, generated)
    scratch = bytearray()
    labels = {}
    with ActivationStore(path, writable=True, map_size_gb=1) as store:
        for i in range(n):
            prompt = f"question {i // 2}"
            hallucinated = (i // 2) % 2
            acts = rng.standard_normal((LAYERS, len(positions), hidden), dtype=np.float32)
            acts[signal_layer] += (0.5 if hallucinated else -0.5) * direction
            index = {
                "layer_ids": range(LAYERS),
                "token_positions": positions,
                "prompt_token_ids": range(8),
                "generated_token_ids": range(generated),
            }
            meta = {
                "prompt": prompt,
                "response": "r",
                "model": "bench",
                "capture_tokens": "generated",
                "dtype": "float16",
                "backend": "bench",
                "timestamp": "t",
                "task": "bench",
            }
            key = record_key(prompt, i % 2)
            value = encode_record(acts.astype(np.float16), "F16", index, meta, scratch)
            if value.obj is not scratch:
                scratch = value.obj
            store.put(key, value)
            labels[key] = {"label": "hallucinated" if hallucinated else "correct", "task": "bench"}
        store.put_labels(labels)


def export_case(tmp: Path, n: int, hidden: int) -> dict[str, object]:
    store = tmp / "export.lmdb"
    write_store(store, n, 17, hidden)
    selection = Selection.parse("all", ["window:16"])
    with open_store(store) as s:
        plan = build_plan(s, selection)
        export_npy(s, plan, tmp / "warm")  # page cache warm for both sides
        nbytes = sum(p.stat().st_size for p in (tmp / "warm").glob("window-16*.npy"))
        shutil.rmtree(tmp / "warm")
        payload = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)

        def ours(path: Path) -> None:
            export_npy(s, plan, path)

        def raw(path: Path) -> None:
            with open(path, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())

        times: dict[str, list[float]] = {"ours": [], "raw": []}
        for i, name in enumerate(("ours", "raw", "raw", "ours") * 3):
            path = tmp / f"w{i}"
            os.sync()  # no dirty pages left by the run before
            t0 = time.perf_counter()
            (ours if name == "ours" else raw)(path)
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        t_ours, t_raw = (statistics.median(times[k]) for k in ("ours", "raw"))
        best_ours, best_raw = (min(times[k]) for k in ("ours", "raw"))
    return {
        "records": n,
        "record_shape": [LAYERS, 16, hidden],
        "bytes": nbytes,
        "export_gb_s": nbytes / t_ours / 1e9,
        "raw_gb_s": nbytes / t_raw / 1e9,
        "ratio": t_raw / t_ours,  # throughput: export ÷ raw, medians
        "best_ratio": best_raw / best_ours,  # the same from the fastest run of each
    }


def read_case(tmp: Path, n: int, hidden: int, layer: int = 20) -> dict[str, object]:
    store = tmp / "read.lmdb"
    write_store(store, n, 2, hidden)
    with open_store(store) as s:
        export = NpyExport(export_npy(s, build_plan(s, Selection.parse()), tmp / "read-npy"))
    path = export.path / "mean.npy"
    rows = np.arange(n)

    def ours() -> np.ndarray:
        return export.read_layers("mean", [layer], rows)[:, 0]

    def plain() -> np.ndarray:
        return np.asarray(np.load(path, mmap_mode="r")[:, layer], dtype=np.float32)

    assert np.array_equal(ours(), plain()), "the two reads disagree"
    result: dict[str, object] = {"records": n, "shape": [n, LAYERS, hidden], "layer": layer}
    for mode in ("cold", "warm"):
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        for _ in range(3):
            for name, fn in (("ours", ours), ("plain", plain)):
                if mode == "cold":
                    drop_cache(path)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        result[f"{mode}_ours_ms"] = best["ours"] * 1000
        result[f"{mode}_plain_ms"] = best["plain"] * 1000
        result[f"{mode}_ratio"] = best["ours"] / best["plain"]
    shutil.rmtree(export.path)
    return result


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def export_child(store: str, out: str) -> None:
    """Run in a fresh process: export, print peak RSS (VmHWM) and sampled peak anonymous RSS."""
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], _status("RssAnon"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with open_store(store) as s:
        export_npy(s, build_plan(s, Selection.parse("all", ["window:16"])), out)
    done.set()
    thread.join()
    print(json.dumps({"vm_hwm": _status("VmHWM"), "peak_anon": peak[0]}))


def memory_case(tmp: Path, n: int, hidden: int) -> list[dict[str, object]]:
    results = []
    for records in (n, 2 * n):
        store = tmp / f"mem{records}.lmdb"
        write_store(store, records, 17, hidden)
        out = tmp / f"mem{records}-npy"
        child = subprocess.run(
            [sys.executable, __file__, "--export-child", str(store), str(out)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        peaks = json.loads(child.stdout.strip().splitlines()[-1])
        output = sum(p.stat().st_size for p in out.glob("*.npy"))
        results.append({"records": records, "output_bytes": output, **peaks})
        shutil.rmtree(store)
        shutil.rmtree(out)
    return results


def probe_case(tmp: Path, n: int, hidden: int) -> dict[str, object]:
    store = tmp / "probe.lmdb"
    t0 = time.perf_counter()
    write_store(store, n, 2, hidden)
    t_store = time.perf_counter() - t0
    selection = Selection.parse()
    t0 = time.perf_counter()
    export = features(store, selection, tmp / "probe")
    t_export = time.perf_counter() - t0
    shutil.rmtree(store)
    report = run_probe(export, selection, ProbeSettings(), tmp / "probe")
    best = report["best"]
    return {
        "samples": n,
        "layers": LAYERS,
        "hidden": hidden,
        "features_bytes": (export.path / "mean.npy").stat().st_size,
        "store_write_s": t_store,
        "export_s": t_export,
        "probe_s": report["seconds"],
        "best_layer": best["layer"],
        "best_auroc": best["auroc"],
        "converged": all(r["converged"] for r in report["results"]),
    }


def run(quick: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        result: dict[str, object] = {"load_average_before": os.getloadavg()}
        result |= {
            "export": export_case(tmp, 40 if quick else 200, 1024 if quick else 4096),
            "read": read_case(tmp, 500 if quick else 4000, 1024 if quick else 4096),
            "memory": memory_case(tmp, 40 if quick else 300, 1024 if quick else 4096),
            "probe": probe_case(tmp, 400 if quick else 10_000, 256 if quick else 4096),
            "load_average_after": os.getloadavg(),  # other work on the machine skews timings
        }
    return result


def main() -> None:
    if sys.argv[1:2] == ["--export-child"]:
        export_child(sys.argv[2], sys.argv[3])
        return
    result = run("--quick" in sys.argv)
    e = result["export"]
    print(
        table(
            "npy export (window:16, all layers; read store + reduce + write + fsync) ÷ raw write",
            ["records", "record shape", "MB", "export GB/s", "raw GB/s", "ratio", "best ratio"],
            [
                [
                    e["records"],
                    "x".join(map(str, e["record_shape"])),
                    round(e["bytes"] / 1e6),
                    e["export_gb_s"],
                    e["raw_gb_s"],
                    e["ratio"],
                    e["best_ratio"],
                ]
            ],
        )
    )
    r = result["read"]
    print(
        table(
            f"one layer ({r['layer']}) of an npy export [{'x'.join(map(str, r['shape']))}] fp16",
            ["cache", "read_layers ms", "plain memmap ms", "ours ÷ plain"],
            [[m, r[f"{m}_ours_ms"], r[f"{m}_plain_ms"], r[f"{m}_ratio"]] for m in ("cold", "warm")],
        )
    )
    print(
        table(
            "export peak memory (fresh process per export)",
            ["records", "output MB", "peak RSS MB", "peak anon MB", "output ÷ peak RSS"],
            [
                [
                    m["records"],
                    round(m["output_bytes"] / 1e6),
                    round(m["vm_hwm"] / 1e6),
                    round(m["peak_anon"] / 1e6),
                    m["output_bytes"] / m["vm_hwm"],
                ]
                for m in result["memory"]
            ],
        )
    )
    p = result["probe"]
    print(
        table(
            f"probe: {p['samples']} samples x {p['layers']} layers x {p['hidden']} fp16, 5 grouped "
            "folds, 1000 bootstrap replicates",
            ["features GB", "store write s", "export s", "probe s", "best layer", "AUROC"],
            [
                [
                    p["features_bytes"] / 1e9,
                    p["store_write_s"],
                    p["export_s"],
                    p["probe_s"],
                    p["best_layer"],
                    p["best_auroc"],
                ]
            ],
        )
    )
    before, after = result["load_average_before"], result["load_average_after"]
    print(f"load average (1, 5, 15 min) before: {before}, after: {after}")
    print("wrote", save("analysis", result))


if __name__ == "__main__":
    main()
