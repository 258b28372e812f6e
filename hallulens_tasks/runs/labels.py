"""`hallulens activations label`: write each judged generation's verdict next to its record.

A sample's `prompt_hash` (the harness's own field) is sha256 of the exact prompt, i.e. the
store key. Repeated prompts have `-1`, `-2`, ... records; the one whose stored task and doc_id
match the sample is the sample's record. Labels go to the store's `labels` sub-database in one
transaction; the records are not touched. An entry holds label, task, doc_id, judge, samples
(the file it came from) and, when the task's doc has one, the gold `answer` (the analysis's
`answer` reduction looks for it in the response; stores labelled before have none). Samples with
claim-level verdicts (LongWiki) also get token-level labels (`token_labels.py`), for which the
tested model's tokenizer is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from hallulens_capture.keys import prompt_hash
from hallulens_capture.store import ActivationStore
from hallulens_tasks.runs.samples import (
    SamplesError,
    expand,
    outcome,
    prompt,
    read_samples,
    response,
)
from hallulens_tasks.runs.token_labels import load_tokenizer, token_entry
from hallulens_tasks.task_table import family_of_task


def _record_key(store: ActivationStore, digest: str, task: str, doc_id: object) -> str | None:
    candidates = []
    n = 0
    key = digest
    while key in store:
        candidates.append(key)
        n += 1
        key = f"{digest}-{n}"
    for key in candidates:
        record = store[key]
        if record.task == task and record.doc_id == doc_id:
            return key
    # a record made without a task (`vllm serve` captures) is the sample's when it is the only one
    untasked = [key for key in candidates if not store[key].task]
    return untasked[0] if len(candidates) == 1 and untasked else None


def label_store(sample_paths: list[Path], store_path: str, tokenizer: str | None = None) -> dict:
    """Label the store's records from judged samples; returns counts per label and unmatched.

    Samples of harness tasks run beside ours (`--tasks hallulens,gsm8k`) have no verdicts:
    they are skipped and named in the summary. `tokenizer` overrides the tokenizer that token
    labels are computed with (default: the record's model's)."""
    labels: dict[str, dict] = {}
    unmatched = 0
    unaligned = 0
    skipped: list[str] = []
    tokenizers: dict[tuple[str, str], object] = {}
    with ActivationStore(store_path, writable=True, create=False) as store:
        for path in sample_paths:
            samples = read_samples(path)
            if family_of_task(samples.task) is None:
                skipped.append(samples.task)
                continue
            for row in samples.rows:
                result = outcome(row)
                if result is None:
                    raise SamplesError(
                        f"{path}: doc {row.get('doc_id')} has no judge verdict; judge the run "
                        "first (without --predict_only, or with `hallulens judge`)"
                    )
                digest = row.get("prompt_hash") or prompt_hash(prompt(row) or "")
                key = _record_key(store, digest, samples.task, row.get("doc_id"))
                if key is None:
                    unmatched += 1
                    continue
                if key in labels:
                    raise SamplesError(f"{path}: record {key} is labelled twice in the inputs")
                labels[key] = {
                    "label": result["label"],
                    "task": samples.task,
                    "doc_id": row.get("doc_id"),
                    "judge": result.get("judge"),
                    "samples": path.name,
                }
                answer = row["doc"].get("answer")
                if isinstance(answer, str) and answer.strip():
                    labels[key]["answer"] = answer
                if "sentences" in result:  # claim-level verdicts: token labels too
                    record = store[key]
                    source = (tokenizer or record.model, "" if tokenizer else record.backend)
                    if source not in tokenizers:
                        tokenizers[source] = load_tokenizer(*source)
                    tokens = token_entry(
                        record, response(row), result["sentences"], tokenizers[source]
                    )
                    if tokens is None:
                        unaligned += 1
                    else:
                        labels[key]["tokens"] = tokens
        if labels:
            store.put_labels(labels)
    counts = Counter(entry["label"] for entry in labels.values())
    summary = {"labelled": len(labels), "unmatched": unmatched, **dict(sorted(counts.items()))}
    if tokenizers:
        summary["token_labelled"] = sum("tokens" in entry for entry in labels.values())
        summary["token_unaligned"] = unaligned
    return {**summary, "skipped_tasks": sorted(set(skipped))} if skipped else summary


def cmd_label(args: argparse.Namespace) -> int:
    summary = label_store(expand(args.samples), args.store, args.tokenizer)
    print(json.dumps(summary))
    if summary.get("skipped_tasks"):
        print(
            f"not HalluLens tasks, left out: {', '.join(summary['skipped_tasks'])}",
            file=sys.stderr,
        )
    if summary.get("token_unaligned"):
        print(
            f"{summary['token_unaligned']} records have no token labels: their tokens do not "
            "decode to the judged response with this tokenizer (give the model's with "
            "--tokenizer)",
            file=sys.stderr,
        )
    if summary["unmatched"]:
        print(
            f"{summary['unmatched']} judged samples have no record in {args.store} "
            "(run without capture, or another store)",
            file=sys.stderr,
        )
    return 0


def register(activations: argparse._SubParsersAction) -> None:
    """`hallulens activations label`."""
    p = activations.add_parser("label", help="write judge verdicts of a run into the store")
    p.add_argument("--samples", nargs="+", required=True, help="judged samples files or dirs")
    p.add_argument("--store", required=True, help="activation store of the same run")
    p.add_argument(
        "--tokenizer",
        help="tokenizer (HF directory or name) for LongWiki's token labels "
        "(default: the tested model's, from each record)",
    )
    p.set_defaults(func=cmd_label)
