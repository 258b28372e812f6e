"""llama.cpp: `hallulens-gguf` capture overhead (with ÷ without) and tokens/s next to
llama-cpp-python's own high-level API doing the same greedy generation.

SmolLM2 Q4_1 GGUF on CPU, one sequence at a time, the same four prompts, `max_gen_toks` N, no
stop strings; capture of the generated tokens, float16, all 31 layers or 4 of them. Runs go in
pairs, back to back, alternating which goes first; ratios are medians of the pairs' ratios
(`common.Pairs`). Every capture run writes into a fresh store.

Both sides of the tokens/s comparison get the same prompts in the same order (the i-th call of
each uses tag i), so greedy decoding gives both the same tokens and the same stopping points, and
llama-cpp-python's state is reset before each prompt, so neither reuses a previous prompt's KV
cache. (Earlier runs tagged the two sides' prompts differently: their answers stopped at EOS
after different lengths, and the fixed per-prompt cost weighed differently on tokens/s.)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from common import Pairs, paired, save, span, table
from llama_cpp import Llama
from lm_eval.api.instance import Instance

from hallulens_models.embedded import smollm2_gguf
from hallulens_models.gguf_lm import HalluLensGGUFLM

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how rain forms, step by step.",
    "List some facts about the Moon and its phases, tides and the way it was formed.",
    "Describe a busy market in the morning.",
]


def ours(lm: HalluLensGGUFLM, new_tokens: int, tag: str) -> int:
    kwargs = {"until": [], "max_gen_toks": new_tokens, "do_sample": False}
    requests = [
        Instance("generate_until", {}, (f"{p} ({tag})", dict(kwargs)), i, ("b", i, 1))
        for i, p in enumerate(PROMPTS)
    ]
    texts = lm.generate_until(requests, disable_tqdm=True)
    return sum(len(lm.tok_encode(t, add_special_tokens=False)) for t in texts)


def high_level(llm: Llama, new_tokens: int, tag: str) -> int:
    """Same prompts through `Llama.create_completion`; tokens counted as for ours (re-encoded)."""
    total = 0
    for p in PROMPTS:
        llm.reset()  # no prefix reuse from the previous prompt: ours prefills every prompt
        out = llm.create_completion(f"{p} ({tag})", max_tokens=new_tokens, temperature=0.0)
        text = out["choices"][0]["text"]
        total += len(llm.tokenize(text.encode(), add_bos=False, special=True))
    return total


def run(lengths=(32, 128), repeats=9) -> dict[str, object]:
    plain = HalluLensGGUFLM(pretrained="smollm2", n_ctx=1024)
    llm = Llama(model_path=str(smollm2_gguf()), n_ctx=1024, verbose=False)
    tags = iter(range(10**9))
    rows = []
    counted: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            first = next(tags) * 1000
            ours_tags, their_tags = iter(range(first, first + 999)), iter(range(first, first + 999))

            def mine(n=n, tags=ours_tags):
                counted["ours"] = ours(plain, n, f"p{next(tags)}")

            def theirs(n=n, tags=their_tags):
                counted["theirs"] = high_level(llm, n, f"p{next(tags)}")

            pairs = paired(mine, theirs, repeats)
            assert counted["ours"] == counted["theirs"], counted  # the same tokens on both sides
            speed = Pairs(pairs.b, pairs.a)  # their seconds ÷ ours: our tokens/s ÷ theirs
            row = {
                "new_tokens": n,
                "ours_tok_s": counted["ours"] / statistics.median(pairs.a),
                "llama_cpp_tok_s": counted["theirs"] / statistics.median(pairs.b),
                "speed_ratio": speed.ratio,
                "speed_interval": speed.interval(),
            }
            for label, layers in (("all", None), ("4 layers", [0, 10, 20, 30])):
                captured = HalluLensGGUFLM(
                    pretrained="smollm2",
                    n_ctx=1024,
                    activations=f"{tmp}/{label}-{n}.lmdb",
                    capture_layers=layers,
                )
                row[f"capture_{label}_ratio"] = paired(
                    lambda c=captured, n=n: ours(c, n, f"c{next(tags)}"),
                    lambda n=n: ours(plain, n, f"c{next(tags)}"),
                    repeats,
                ).ratio
            rows.append(row)
    return {"rows": rows}


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    start = time.perf_counter()
    result = run(lengths=(32,) if quick else (32, 128), repeats=2 if quick else 9)
    print(
        table(
            "llama.cpp (SmolLM2 Q4_1, CPU): tokens/s ours vs llama-cpp-python's API; "
            "capture with ÷ without (generated tokens, float16)",
            [
                *["new tokens", "ours tok/s", "llama-cpp tok/s", "ours ÷ theirs", "95 % interval"],
                *["capture all ÷", "capture 4 ÷"],
            ],
            [
                [
                    r["new_tokens"],
                    r["ours_tok_s"],
                    r["llama_cpp_tok_s"],
                    r["speed_ratio"],
                    span(r["speed_interval"]),
                    r["capture_all_ratio"],
                    r["capture_4 layers_ratio"],
                ]
                for r in result["rows"]
            ],
        )
    )
    print(save("gguf", result), f"({time.perf_counter() - start:.0f} s)")
