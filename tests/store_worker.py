"""Subprocess side of the store tests: `write PATH N` or `read PATH N` (prints a JSON report)."""

import json
import sys
import time

import numpy as np

from hallulens_capture import open_store, record_key
from hallulens_capture.record import encode_record
from hallulens_capture.report import check_record
from hallulens_capture.store import ActivationStore

TOKENS, HIDDEN = 48, 1024  # ~200 KB per record


def sample(i: int) -> tuple[str, bytearray]:
    prompt = f"prompt number {i}"
    acts = np.full((2, TOKENS, HIDDEN), i, dtype=np.float16)
    index = {
        "layer_ids": [0, 1],
        "token_positions": np.arange(TOKENS),
        "prompt_token_ids": np.arange(TOKENS),
        "generated_token_ids": [1],
    }
    meta = {
        "prompt": prompt,
        "response": f"r{i}",
        "model": "m",
        "timestamp": "t",
        "backend": "test",
        "capture_tokens": "prompt",
        "dtype": "float16",
        "format": "hallulens-record/1",
    }
    return record_key(prompt), encode_record(acts, "F16", index, meta)


def write(path: str, n: int) -> None:
    with ActivationStore(path, writable=True, map_size_gb=1 / 1024) as store:  # 1 MiB: grows often
        for i in range(n):
            store.put(*sample(i))
            time.sleep(0.01)


def read(path: str, n: int) -> None:
    deadline = time.time() + 120
    while True:  # the writer may not have created the store yet
        try:
            store = open_store(path)
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.02)
    counts, checked, problems = [], set(), []
    while time.time() < deadline:
        store.refresh()
        counts.append(len(store))
        for key in store:
            if key in checked:
                continue
            record = store[key]
            i = int(record.prompt.rsplit(" ", 1)[1])
            problems += check_record(record)
            if not np.all(record.all_layers_activations == i) or key != sample(i)[0]:
                problems.append(f"{key}: wrong content")
            checked.add(key)
        if counts[-1] >= n:
            break
        time.sleep(0.005)
    print(json.dumps({"counts": counts, "checked": len(checked), "problems": problems}))


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](sys.argv[2], int(sys.argv[3]))
