"""`hallulens activations merge`: one LMDB environment from a store of shards.

Readers already see a store's shards as one mapping; merging is for users who want one file
(to copy, or for tools that open `data.mdb` themselves). Every record is checked as `verify`
checks it (header, checksum, finite values) before anything is written, a key in two
environments or a shard whose writer did not finish stops the merge, and the record bytes are
copied as they are, so a merged record is byte for byte the one that was captured.
"""

from __future__ import annotations

import os
import shutil

from hallulens_capture.errors import RecordFormatError, StoreError
from hallulens_capture.keys import shown_key
from hallulens_capture.report import check_record
from hallulens_capture.store import ActivationStore, open_store


def _unfinished(store: ActivationStore) -> list[str]:
    return [shard["name"] for shard in store.shards() if shard["complete"] is None]


def merge_store(source: str, target: str, *, incomplete_ok: bool = False) -> dict[str, int]:
    """Write every record and label of `source` into the new store `target`; all or nothing."""
    if os.path.exists(target):
        raise StoreError(f"{target} exists already; merge writes a new store")
    with open_store(source) as store:
        unfinished = _unfinished(store)
        if unfinished and not incomplete_ok:
            raise StoreError(
                f"{source}: shard {', '.join(unfinished)} has no completion marker (its writer "
                "is still running, or was stopped: run it again to complete it), or pass "
                "--incomplete-ok to merge what is there"
            )
        conflicts = store.conflicts()
        if conflicts:
            key, where = next(iter(conflicts.items()))
            raise StoreError(
                f"{source}: {len(conflicts)} key(s) written twice, e.g. {key} in "
                f"{' and '.join(where)}; nothing merged (keep the shard that should hold each)"
            )
        keys = list(store)
        for key in keys:
            try:
                problems = check_record(store[key])
            except RecordFormatError as exc:
                problems = [exc.problem]
            if problems:
                raise StoreError(
                    f"{source}: record {shown_key(key)}: {'; '.join(problems)}; nothing merged "
                    f"(`hallulens activations verify {source}` lists every bad record)"
                )
        try:
            with ActivationStore(target, writable=True) as merged:
                for key in keys:
                    merged.put(key, store[key].buffer)
                labels = store.labels()
                if labels:
                    merged.put_labels(labels)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return {
            "records": len(keys),
            "labels": len(labels),
            "environments": len(store.environments()),
        }
