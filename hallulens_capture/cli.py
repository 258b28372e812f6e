"""`hallulens activations ls|show|stats|verify|merge`: look into a store from the shell."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

import numpy as np

from hallulens_capture.errors import HalluLensError, RecordFormatError, StoreError
from hallulens_capture.keys import shown_key
from hallulens_capture.merge import merge_store
from hallulens_capture.options import checked_number
from hallulens_capture.report import check_record, summarize, verify
from hallulens_capture.store import open_store


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


@contextlib.contextmanager
def _refuse_bad_records(path: str) -> Iterator[None]:
    """A command over every record stops at a bad one, pointing to `verify` for the full list."""
    try:
        yield
    except RecordFormatError as exc:
        raise StoreError(
            f"{exc} (`hallulens activations verify {path}` lists every bad record)"
        ) from None


def cmd_ls(args: argparse.Namespace) -> int:
    if args.limit is not None:
        checked_number("--limit", args.limit, minimum=0, integer=True, error=HalluLensError)
    with open_store(args.path) as store, _refuse_bad_records(args.path):
        print(
            f"{'key':<68} {'task':<24} {'doc':>5} {'layers':>6} {'tokens':>6} {'hidden':>6} "
            f"{'dtype':<8} {'bytes':>12}  model"
        )
        for n, key in enumerate(store):
            if args.limit is not None and n >= args.limit:
                print(f"... {len(store) - n} more")
                break
            r = store[key]
            layers, tokens, hidden = r.shape
            doc = "" if r.doc_id is None else r.doc_id
            print(
                f"{key:<68} {(r.task or '-')[:24]:<24} {doc!s:>5} {layers:>6} {tokens:>6} "
                f"{hidden:>6} {r.dtype:<8} {r.nbytes:>12}  {r.model}"
            )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with open_store(args.path) as store:
        if args.key not in store:
            raise StoreError(f"no record {shown_key(args.key)} in {args.path}")
        r = store[args.key]
        gen_kwargs = r.gen_kwargs  # a bad record is refused before anything is printed
        for name in ("model", "backend", "task", "doc_id", "timestamp", "capture_tokens", "dtype"):
            print(f"{name:>20}: {getattr(r, name)}")
        print(f"{'gen_kwargs':>20}: {json.dumps(gen_kwargs)}")
        print(f"{'prompt':>20}: {r.prompt!r}")
        print(f"{'response':>20}: {r.response!r}")
        print(f"{'prompt_token_ids':>20}: {len(r.prompt_token_ids)} tokens")
        print(f"{'generated_token_ids':>20}: {len(r.generated_token_ids)} tokens")
        positions = r.token_positions
        span = f"{positions[0]}..{positions[-1]}" if len(positions) else "none"
        print(f"{'token_positions':>20}: {span} ({len(positions)})")
        print(
            f"{'all_layers_activations':>20}: shape {list(r.shape)}, {r.storage_dtype}, "
            f"{_mib(r.nbytes)} record"
        )
        print(
            f"{'activations':>20}: shape {list(r.activations.shape)} (layer {int(r.layer_ids[-1])})"
        )
        print("  layer  mean |h|_2   max |h|")
        for layer in r.layer_ids:
            values = r.slice(layers=[int(layer)])[0].astype(np.float32)
            norm = float(np.linalg.norm(values, axis=-1).mean()) if values.size else 0.0
            peak = float(np.abs(values).max()) if values.size else 0.0
            print(f"  {int(layer):>5}  {norm:>11.3f}  {peak:>8.3f}")
        _show_token_stats(r)
        problems = check_record(r)
        print("  ok" if not problems else "  problems: " + "; ".join(problems))
    return 0


SHOWN_TOKENS = 32


def _show_token_stats(r) -> None:
    """Per generated token: its id, logprob, the entropy and the first top-k alternatives."""
    logprobs, entropy = r.generated_logprobs, r.generated_entropy
    ids, top = r.topk_ids, r.topk_logprobs
    if logprobs is None or entropy is None or ids is None or top is None:
        print(f"{'token statistics':>20}: none (capture_topk={r.capture_topk})")
        return
    n = len(logprobs)
    summary = (
        f"mean logprob {logprobs.mean():.3f}, min {logprobs.min():.3f}, "
        f"mean entropy {entropy.mean():.3f}"
        if n
        else "no generated tokens"
    )
    print(f"{'token statistics':>20}: top-{ids.shape[1]} per generated token; {summary}")
    print("  token      id   logprob  entropy  most likely (id:logprob)")
    for j in range(min(n, SHOWN_TOKENS)):
        pairs = zip(ids[j, :3], top[j, :3], strict=True)
        best = " ".join(f"{int(i)}:{float(v):.2f}" for i, v in pairs)
        token = int(r.generated_token_ids[j])
        print(f"  {j:>5}  {token:>6}  {logprobs[j]:>8.3f}  {entropy[j]:>7.3f}  {best}")
    if n > SHOWN_TOKENS:
        print(f"  ... {n - SHOWN_TOKENS} more")


def cmd_stats(args: argparse.Namespace) -> int:
    with open_store(args.path) as store, _refuse_bad_records(args.path):
        stats = summarize(store).as_dict()
        stats["shards"] = store.shards()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"store        : {args.path}")
    print(f"records      : {stats['records']}")
    print(f"record bytes : {stats['record_bytes']} ({_mib(stats['record_bytes'])})")
    print(
        f"pages in use : {_mib(stats['used_bytes'])} ({_mib(stats['file_bytes_on_disk'])} on disk)"
    )
    tpr = stats["tokens_per_record"]
    print(
        f"tokens       : {stats['tokens']} (per record min {tpr['min']}, "
        f"mean {tpr['mean']:.1f}, max {tpr['max']})"
    )
    for name in (
        "layers",
        "hidden_sizes",
        "dtypes",
        "capture_tokens",
        "capture_topk",
        "models",
        "backends",
        "tasks",
    ):
        values = ", ".join(f"{k} x{v}" for k, v in stats[name].items()) or "-"
        print(f"{name:<13}: {values}")
    if stats["shards"]:
        print(f"shards       : {len(stats['shards'])}")
        for shard in stats["shards"]:
            state = "complete" if shard["complete"] is not None else "incomplete"
            if shard["writing"]:
                state = "being written"
            print(f"  {shard['name']:<11}: {shard['records']} records, {state}")
    if stats["mixed"]:
        differ = ", ".join(f"{n} {name}" for name, n in stats["mixed"].items())
        print(
            f"mixed        : {differ}: records made with different settings; analyse one kind "
            "at a time"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with open_store(args.path) as store:
        result = verify(store, read_values=not args.headers_only)
    for key, problems in result.bad.items():
        print(f"BAD {key}: {'; '.join(problems)}")
    print(f"{result.records - len(result.bad)} of {result.records} records ok")
    if result.no_checksum and not args.headers_only:
        print(
            f"{result.no_checksum} records have no checksum (written before checksums were "
            "added): their bytes were not checked against one"
        )
    return 1 if result.bad else 0


def cmd_merge(args: argparse.Namespace) -> int:
    done = merge_store(args.path, args.out, incomplete_ok=args.incomplete_ok)
    print(
        f"merged {done['records']} records and {done['labels']} labels from "
        f"{done['environments']} environments of {args.path} into {args.out}"
    )
    return 0


def register(activations: argparse._SubParsersAction) -> None:
    """`hallulens activations ls|show|stats|verify|merge`."""
    p = activations.add_parser("ls", help="one line per record")
    p.add_argument("path")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_ls)
    p = activations.add_parser("show", help="one record: fields, shapes, per-layer norms")
    p.add_argument("key")
    p.add_argument("path")
    p.set_defaults(func=cmd_show)
    p = activations.add_parser("stats", help="counts and sizes over the whole store")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)
    p = activations.add_parser("verify", help="check every record; exit 1 if any is bad")
    p.add_argument("path")
    p.add_argument("--headers-only", action="store_true", help="skip reading activation values")
    p.set_defaults(func=cmd_verify)
    p = activations.add_parser("merge", help="one LMDB environment from a store of shards")
    p.add_argument("path", help="the store (its root environment and shards)")
    p.add_argument("out", help="the new store to write (must not exist)")
    p.add_argument(
        "--incomplete-ok",
        action="store_true",
        help="merge shards whose writer did not finish (no completion marker)",
    )
    p.set_defaults(func=cmd_merge)
