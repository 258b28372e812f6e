"""HF capture overhead: wall time of `generate_until` with capture ÷ without, same batch.

SmolLM2 (float32 weights on CPU), greedy, generation forced to exactly N new tokens
(`min_new_tokens`), all 31 layers or a 4-layer subset, float16 storage, generated tokens.
The two backends share one model and run in pairs, back to back, alternating which goes
first; the ratio is the median of the pairs' ratios with its 95 % interval (`common.Pairs`).
With `--control`, rows of layers "none (control)" time a second plain backend over the same
model against the first in the same way: what the run finds where nothing differs. On this
2-core host the speed of whole calls swings with the neighbours' load, from ~1 % of a call in
quiet hours to 6-7 % (per pair of calls) in busy ones, and a control's median strays as far as
a capture row's.
Every capture run writes into a fresh store (an existing record would be resumed, not
generated).

Hand-over (`handover`): the host side of a finished batch alone, at a size where it shows: the
rows of B answers, each step of them in a block [33 layers, B, 1, 4096] float16 as the HF step
log keeps them, handed to the record writer (`CaptureSession`) and synced, ÷ appending the same
bytes to a plain file and syncing it; "producer" is the caller's time until the last row is
queued (what a GPU waits before its next batch). Its records (34 MB) are over glibc's 32 MiB
mmap threshold: it runs once more in a child started with malloc's huge pages
(`hallulens_capture.hugepages`).

Final sync (`final_sync`): a call of several such batches with the engine's time between them
(a pause), then the sync that ends the call, with the writer having the kernel start writing
its file out every `store.WRITEBACK_BYTES` and without (without, the committed pages wait in
memory until that sync).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch
from common import (
    huge_pages_enabled,
    numbers,
    paired,
    run_case,
    run_with_huge_pages,
    save,
    span,
    table,
)
from lm_eval.api.instance import Instance

from hallulens_capture import store as store_module
from hallulens_capture.keys import record_key
from hallulens_capture.positions import token_positions
from hallulens_capture.session import CapturedSample, CaptureSession, SampleRequest
from hallulens_capture.spec import CaptureSpec
from hallulens_models.hf_lm import HalluLensHFLM
from hallulens_models.hf_tap import StepLog

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how rain forms.",
    "List some facts about the Moon and its phases, tides and the way it was formed.",
    "Describe a busy market.",
]


def requests(batch: int, new_tokens: int, tag: str) -> list[Instance]:
    kwargs = {
        "until": [],
        "max_gen_toks": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
    }
    return [
        Instance(
            "generate_until",
            {},
            (f"{PROMPTS[i % len(PROMPTS)]} ({tag}{i})", dict(kwargs)),
            i,
            ("b", i, 1),
        )
        for i in range(batch)
    ]


def backend(batch: int, shared: HalluLensHFLM | None = None, **capture) -> HalluLensHFLM:
    """SmolLM2 on the CPU; with `shared`, a backend over that one's model and tokenizer. Sides
    compared share one model: two loads of the same weights differ in speed by themselves (two
    plain backends, paired: 1.016-1.031 over three runs of 9 pairs, the first loaded slower;
    one model under both: 1.001-1.006)."""
    if shared is None:
        return HalluLensHFLM(
            pretrained="smollm2", device="cpu", dtype="float32", batch_size=batch, **capture
        )
    return HalluLensHFLM(
        pretrained=shared.model, tokenizer=shared.tokenizer, batch_size=batch, **capture
    )


CONTROL = "none (control)"  # the `layers` of a control row: a second plain backend ÷ plain


def run(
    batches=(1, 4, 16), lengths=(16, 64), repeats=9, per_call=1, control=False
) -> dict[str, object]:
    """The capture table; each call is `per_call` batches (lm-eval asks for a task's every
    request in one call: the writer's sync then ends the run, not each batch). With `control`,
    each batch also gets rows timing a second plain backend against the first in the same way:
    the ratio a run finds where there is no difference at all, its own noise."""
    rows = []
    tags = iter(range(10**9))  # fresh prompts every run: a stored prompt would be resumed

    def generate(lm: HalluLensHFLM, batch: int, new_tokens: int) -> None:
        lm.generate_until(requests(batch * per_call, new_tokens, f"r{next(tags)}-"))

    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            plain = backend(batch)
            for layers in ("all", "0,10,20,30", *([CONTROL] if control else [])):
                if layers == CONTROL:
                    other = backend(batch, plain)
                else:
                    store = f"{tmp}/{batch}-{layers}"
                    other = backend(batch, plain, activations=store, capture_layers=layers)
                for n in lengths:
                    pairs = paired(
                        partial(generate, other, batch, n),
                        partial(generate, plain, batch, n),
                        repeats,
                    )
                    rows.append(
                        {
                            "layers": layers,
                            "batch": batch,
                            "batches_per_call": per_call,
                            "new_tokens": n,
                            "without_s": statistics.median(pairs.b),
                            "with_s": statistics.median(pairs.a),
                            "ratio": pairs.ratio,
                            "interval": pairs.interval(),
                            "pair_ratios": pairs.ratios,
                        }
                    )
                del other
                gc.collect()
            del plain
            gc.collect()
    return {"rows": rows, "repeats": repeats, "storage": "float16", "tokens": "generated"}


def step_log(batch: int, steps: int, layers: int, hidden: int) -> StepLog:
    """A finished batch's step log as HF capture keeps it, random float16 rows."""
    log = StepLog(layers, hidden, torch.float16, cuda=False)
    for step in range(1, steps + 1):
        log.blocks[step] = torch.randn(layers, batch, 1, hidden).half()
    return log


def row_writer(path: str, layers: int, writers: int) -> CaptureSession:
    """A capture session of generated tokens into a fresh store at `path`, without statistics."""
    spec = CaptureSpec.from_model_args(path, capture_tokens="generated", capture_topk=0, environ={})
    return CaptureSession(spec, list(range(layers)), "m", "hf", writers=writers)


def write_batch(writer: CaptureSession, log: StepLog, batch: int, steps: int, label: str) -> None:
    """Hand a finished batch's rows to the writer, as HF capture does."""
    positions = token_positions("generated", 2, steps)
    for row in range(batch):
        sample = CapturedSample([1, 2], list(range(steps)), positions, log.row(row, 0, steps - 1))
        request = SampleRequest(f"{label} row {row}")
        writer.write(record_key(request.prompt), request, "r", sample)


def final_sync(
    batches: int = 3, pause: float = 3.0, batch: int = 16, steps: int = 128, repeats: int = 3
) -> dict[str, object]:
    """Seconds of the sync ending a call of `batches` batches `pause` apart, with and without
    the writer starting the kernel's write-out as it goes (alternating)."""
    layers, hidden = 33, 4096
    log = step_log(batch, steps, layers, hidden)
    times: dict[str, list[float]] = {"with": [], "without": []}
    every = store_module.WRITEBACK_BYTES
    with (
        tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp,
        contextlib.ExitStack() as restore,
    ):
        restore.callback(setattr, store_module, "WRITEBACK_BYTES", every)
        for i in range(repeats):
            for name in ("with", "without") if i % 2 == 0 else ("without", "with"):
                path = f"{tmp}/{name}{i}"
                store_module.WRITEBACK_BYTES = every if name == "with" else 1 << 62  # or never
                writer = row_writer(path, layers, writers=1)
                for b in range(batches):
                    write_batch(writer, log, batch, steps, f"{path} batch {b}")
                    time.sleep(pause)  # the engine runs the next batch
                start = time.perf_counter()
                writer.close()
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(path)
    return {
        "batches": batches,
        "pause_s": pause,
        "gb": batches * batch * (steps - 1) * layers * hidden * 2 / 1e9,
        "with_s": statistics.median(times["with"]),
        "without_s": statistics.median(times["without"]),
    }


def handover(
    batch: int = 16,
    steps: int = 128,
    layers: int = 33,
    hidden: int = 4096,
    repeats: int = 5,
    writers: int = 1,
) -> dict[str, object]:
    """Seconds to store one finished batch's rows through the writer ÷ a plain synced file
    (`writers`: as HALLULENS_CAPTURE_WRITERS)."""
    log = step_log(batch, steps, layers, hidden)
    nbytes = batch * (steps - 1) * layers * hidden * 2
    times: dict[str, list[float]] = {"session": [], "plain": [], "producer": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:

        def session(path: str) -> None:
            writer = row_writer(path, layers, writers)
            start = time.perf_counter()
            write_batch(writer, log, batch, steps, path)
            times["producer"].append(time.perf_counter() - start)
            writer.close()  # flush: written and synced

        def plain(path: str) -> None:
            joined = np.empty((layers, steps - 1, hidden), np.float16)  # one reused buffer
            with open(path, "wb") as f:
                for row in range(batch):
                    log.row(row, 0, steps - 1).copy_into(joined)
                    f.write(joined.data)
                f.flush()
                os.fdatasync(f.fileno())

        for i in range(repeats):
            for name in ("session", "plain") if i % 2 == 0 else ("plain", "session"):
                path = f"{tmp}/{name}{i}"
                start = time.perf_counter()
                (session if name == "session" else plain)(path)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    ratios = [a / b for a, b in zip(times["session"], times["plain"], strict=True)]
    return {
        "huge_pages": huge_pages_enabled(),
        "writers": writers,
        "batch": batch,
        "steps": steps,
        "gb": nbytes / 1e9,
        "session_s": statistics.median(times["session"]),
        "plain_s": statistics.median(times["plain"]),
        "producer_s": statistics.median(times["producer"]),
        "ratio": statistics.median(ratios),
    }


def options() -> argparse.Namespace:
    """This benchmark's own options (`make bench` passes every benchmark the same arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--batches", help="comma-separated batch sizes (default 1,4,16; 1,4 with --quick)"
    )
    parser.add_argument("--repeats", type=int, help="pairs of calls (default 9, 2 with --quick)")
    parser.add_argument(
        "--new-tokens", help="comma-separated answer lengths (default 16,64; 16 with --quick)"
    )
    parser.add_argument(
        "--batches-per-call", type=int, default=1, help="batches in each call (default 1)"
    )
    parser.add_argument(
        "--capture-only", action="store_true", help="the capture table alone, no hand-over"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also time a second plain backend against the first: the run's own noise",
    )
    return parser.parse_known_args()[0]


if __name__ == "__main__":
    if run_case({"handover": handover}):
        sys.exit()
    args = options()
    quick = args.quick
    result = run(
        batches=numbers(args.batches) or ((1, 4) if quick else (1, 4, 16)),
        lengths=numbers(args.new_tokens) or ((16,) if quick else (16, 64)),
        repeats=args.repeats or (2 if quick else 9),
        per_call=args.batches_per_call,
        control=args.control,
    )
    print(
        table(
            "HF capture overhead (SmolLM2, CPU): wall with ÷ without capture",
            [
                *["layers", "batch", "batches per call", "new tokens", "without s", "with s"],
                *["ratio", "95 % interval"],
            ],
            [
                [
                    *[r["layers"], r["batch"], r["batches_per_call"], r["new_tokens"]],
                    *[r["without_s"], r["with_s"]],
                    *[r["ratio"], span(r["interval"])],
                ]
                for r in result["rows"]
            ],
        )
    )
    if args.capture_only:
        print("wrote", save("capture_hf", result))
        sys.exit()
    repeats = 3 if quick else 5
    result["handover"] = [handover(repeats=repeats, writers=n) for n in (1, 2)]
    result["handover"] += [
        run_with_huge_pages(__file__, "handover", repeats=repeats, writers=n) for n in (1, 2)
    ]
    print(
        table(
            "Hand-over of a finished batch (host side): writer ÷ plain synced file",
            [
                *["writers", "malloc huge pages", "batch", "steps", "GB", "writer s", "plain s"],
                *["producer s", "ratio"],
            ],
            [
                [
                    h["writers"],
                    "yes" if h["huge_pages"] else "no",
                    h["batch"],
                    h["steps"],
                    h["gb"],
                    h["session_s"],
                    h["plain_s"],
                    h["producer_s"],
                    h["ratio"],
                ]
                for h in result["handover"]
            ],
        )
    )
    result["final_sync"] = final_sync(repeats=3 if quick else 5)
    f = result["final_sync"]
    print(
        f"Sync ending a call of {f['batches']} batches {f['pause_s']} s apart ({f['gb']:.2f} GB): "
        f"{f['with_s']:.3f} s with the write-out started as records come, "
        f"{f['without_s']:.3f} s without"
    )
    print("wrote", save("capture_hf", result))
