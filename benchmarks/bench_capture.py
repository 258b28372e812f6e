"""HF capture overhead: wall time of `generate_until` with capture ÷ without, same batch.

SmolLM2 (float32 weights on CPU), greedy, generation forced to exactly N new tokens
(`min_new_tokens`), all 31 layers or a 4-layer subset, float16 storage, generated tokens.
The two backends run alternately; every capture run writes into a fresh store (an existing
record would be resumed, not generated).
"""

from __future__ import annotations

import gc
import sys
import tempfile
from functools import partial

from common import save, side_by_side, table
from lm_eval.api.instance import Instance

from hallulens_models.hf_lm import HalluLensHFLM

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


def backend(batch: int, **capture) -> HalluLensHFLM:
    return HalluLensHFLM(
        pretrained="smollm2", device="cpu", dtype="float32", batch_size=batch, **capture
    )


def run(batches=(1, 4, 16), lengths=(16, 64), repeats=5) -> dict[str, object]:
    rows = []
    tags = iter(range(10**9))  # fresh prompts every run: a stored prompt would be resumed

    def generate(lm: HalluLensHFLM, batch: int, new_tokens: int) -> None:
        lm.generate_until(requests(batch, new_tokens, f"r{next(tags)}-"))

    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            plain = backend(batch)
            for layers in ("all", "0,10,20,30"):
                store = f"{tmp}/{batch}-{layers}"
                capturing = backend(batch, activations=store, capture_layers=layers)
                for n in lengths:
                    t_with, t_without = side_by_side(
                        partial(generate, capturing, batch, n),
                        partial(generate, plain, batch, n),
                        repeats,
                    )
                    rows.append(
                        {
                            "layers": layers,
                            "batch": batch,
                            "new_tokens": n,
                            "without_s": t_without,
                            "with_s": t_with,
                            "ratio": t_with / t_without,
                        }
                    )
                del capturing
                gc.collect()
            del plain
            gc.collect()
    return {"rows": rows, "repeats": repeats, "storage": "float16", "tokens": "generated"}


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    result = run(batches=(1, 4) if quick else (1, 4, 16), lengths=(16,) if quick else (16, 64))
    print(
        table(
            "HF capture overhead (SmolLM2, CPU): wall with ÷ without capture",
            ["layers", "batch", "new tokens", "without s", "with s", "ratio"],
            [
                [r["layers"], r["batch"], r["new_tokens"], r["without_s"], r["with_s"], r["ratio"]]
                for r in result["rows"]
            ],
        )
    )
    print("wrote", save("capture_hf", result))
