"""`hallulens activations audit`: the checks whose absence cost detector builders weeks.

Records against labels (each side missing the other), records that fail the format checks,
responses that reached `max_gen_toks` (likely cut), prompts with several records and (task,
doc_id) pairs stored more than once, token rows that are all zero or hold NaN/inf, and the
length distributions. Problems (broken records, bad rows, labels without a record) make the
command exit 1; the rest is information.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from hallulens_capture.errors import RecordFormatError
from hallulens_capture.report import check_record
from hallulens_capture.store import ActivationStore

HARNESS_MAX_GEN_TOKS = 256  # lm-eval's default when a task sets none
EXAMPLES = 5  # keys listed per finding


def _distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    q = np.percentile(values, [0, 10, 50, 90, 100])
    return {
        "min": int(q[0]),
        "p10": float(q[1]),
        "median": float(q[2]),
        "p90": float(q[3]),
        "max": int(q[4]),
        "mean": float(np.mean(values)),
    }


def _bad_rows(record) -> tuple[int, int]:
    """(all-zero rows, rows holding NaN or inf) over every (layer, token) row."""
    zero = nonfinite = 0
    acts = record.all_layers_activations
    for layer in range(acts.shape[0]):  # one layer at a time: bounded temporaries
        rows = np.asarray(acts[layer])
        zero += int((~rows.any(axis=-1)).sum())
        nonfinite += int((~np.isfinite(rows).all(axis=-1)).sum())
    return zero, nonfinite


def audit(store: ActivationStore, *, max_gen_toks: int | None = None, rows: bool = True) -> dict:
    """Audit every record; `max_gen_toks` overrides the limit a record's gen_kwargs name."""
    labels = store.labels()
    findings: dict[str, list[str]] = {
        name: []
        for name in ("bad_records", "zero_rows", "nonfinite_rows", "unlabelled", "cut", "empty")
    }
    digests: Counter[str] = Counter()
    docs: Counter[tuple[str, object]] = Counter()
    per_task: dict[str, Counter] = {}
    generated, prompts = [], []
    zero_rows = nonfinite_rows = 0
    for key in store:
        try:
            record = store[key]
            problems = check_record(record, read_values=False)
        except RecordFormatError as exc:
            record, problems = None, [str(exc)]
        if problems or record is None:
            findings["bad_records"].append(f"{key}: {'; '.join(problems)}")
            continue
        digests[key.split("-")[0]] += 1
        label = labels.get(key, {}).get("label")
        task = record.task or labels.get(key, {}).get("task") or "-"
        docs[(task, record.doc_id)] += 1
        per_task.setdefault(task, Counter())[label or "none"] += 1
        if label is None:
            findings["unlabelled"].append(key)
        n_generated = len(record.generated_token_ids)
        generated.append(n_generated)
        prompts.append(len(record.prompt_token_ids))
        limit = max_gen_toks or record.gen_kwargs.get("max_gen_toks") or HARNESS_MAX_GEN_TOKS
        if n_generated >= int(limit):
            findings["cut"].append(key)
        if not record.response.strip():
            findings["empty"].append(key)
        if rows:
            zero, nonfinite = _bad_rows(record)
            zero_rows, nonfinite_rows = zero_rows + zero, nonfinite_rows + nonfinite
            if zero:
                findings["zero_rows"].append(key)
            if nonfinite:
                findings["nonfinite_rows"].append(key)
    orphans = sorted(set(labels) - set(store))
    repeated = {d: n for d, n in digests.items() if n > 1}
    twice = {f"{t} doc {d}": n for (t, d), n in docs.items() if n > 1 and d is not None}
    broken = bool(findings["bad_records"] or orphans or zero_rows or nonfinite_rows)
    return {
        "store": store.path,
        "records": len(store),
        "labels": len(labels),
        "ok": not broken,
        "problems": {
            "bad_records": _listed(findings["bad_records"]),
            "labels_without_record": _listed(orphans),
            "records_with_zero_rows": _listed(findings["zero_rows"]),
            "zero_rows": zero_rows,
            "records_with_nonfinite_rows": _listed(findings["nonfinite_rows"]),
            "nonfinite_rows": nonfinite_rows,
        },
        "notes": {
            "records_without_label": _listed(findings["unlabelled"]),
            "responses_at_max_gen_toks": _listed(findings["cut"]),
            "empty_responses": _listed(findings["empty"]),
            "prompts_with_several_records": {
                "count": len(repeated),
                "records": sum(repeated.values()),
            },
            "task_doc_with_several_records": _listed(sorted(twice)),
        },
        "labels_by_task": {t: dict(sorted(c.items())) for t, c in sorted(per_task.items())},
        "generated_tokens": _distribution(generated),
        "prompt_tokens": _distribution(prompts),
        "rows_checked": rows,
    }


def _listed(keys: list[str]) -> dict[str, object]:
    return {"count": len(keys), "examples": keys[:EXAMPLES]}
