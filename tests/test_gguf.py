"""`hallulens-gguf` on the real SmolLM2 Q4_1 GGUF: capture vs an HF forward pass of the
dequantized weights, chat template vs the HF tokenizer's, loglikelihoods, and the stock CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import TEST_TASKS, report, run_cli
from lm_eval.api.instance import Instance
from reference import NO_TOKENS, compare_record, compare_token_stats

from hallulens_capture import open_store
from hallulens_capture.report import verify
from hallulens_models.gguf_lm import HalluLensGGUFLM

# Measured: every (layer, token) row of a right capture has cosine >= 0.9967 to the fp32 HF pass
# (llama.cpp's quantized dot products differ from fp32 math); a layer off by one has rows
# below 0.94, a token off by one rows below 0.49. 0.99 separates them.
MIN_COSINE = 0.99
# Token statistics of the quantized model against the fp32 pass of its dequantized weights,
# max abs error over 36 tokens (llama.cpp also quantizes activations in its dot products):
# measured logprob 0.37, entropy 0.71, top-20 logprobs 1.78 (tail entries near -10 move most).
# The same records compared one position off give errors of 16-22 (logprob), 17-24 (top-20),
# 2.6-5.0 (entropy). About twice the measured errors separates them.
TOKEN_TOLERANCE = {"logprob": 0.75, "entropy": 1.5, "topk": 3.5}
QUESTIONS = [
    "What is the capital of France?",
    "Name a large animal that lives in the ocean.",
    "Write one sentence about autumn leaves and rain.",
]


def generate(lm, prompts, max_gen_toks=12, until=("\n\n",)):
    requests = [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(p, {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}),
            idx=0,
            metadata=("gguf_probe", i, 1),
        )
        for i, p in enumerate(prompts)
    ]
    return lm.generate_until(requests, disable_tqdm=True)


@pytest.fixture(scope="module")
def chats():
    lm = HalluLensGGUFLM(pretrained="smollm2")
    return [lm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.mark.parametrize(
    ("tokens", "dtype", "layers", "batch"),
    [
        ("all", "float32", None, 1),
        ("all", "float32", None, 3),
        ("generated", "float16", [0, 15, 30], 2),
        ("prompt", "bfloat16", [-2], 1),
        ("response", "float32", [0, 15, 30], 2),  # the last layer: all prompt logits asked
    ],
)
def test_capture_matches_hf_forward(tmp_path, reference_model, chats, tokens, dtype, layers, batch):
    store_path = tmp_path / "acts.lmdb"
    lm = HalluLensGGUFLM(
        pretrained="smollm2",
        activations=str(store_path),
        capture_tokens=tokens,
        capture_dtype=dtype,
        capture_layers=layers,
        batch_size=batch,
    )
    # Batched answers may differ from one-at-a-time ones where two tokens nearly tie (llama.cpp's
    # batched kernels round differently); each record must still match an HF pass on its own
    # tokens, which a row or KV entry crossed between sequences would not.
    texts = generate(lm, chats)
    assert all(texts)
    with open_store(store_path) as store:
        checked = verify(store)
        assert len(store) == len(chats) and checked.bad == {} and checked.no_checksum == 0
        lowest, stats = 1.0, NO_TOKENS
        for key in store:
            record = store[key]
            assert record.backend == "gguf" and record.response in texts
            stats = stats.worst(compare_token_stats(record, reference_model))
            np.testing.assert_array_equal(record.topk_ids[:, 0], record.generated_token_ids)
            if tokens == "response":  # the states that produced the generated tokens
                n_prompt, n_gen = len(record.prompt_token_ids), len(record.generated_token_ids)
                first = n_prompt - 1
                assert list(record.token_positions) == list(range(first, first + n_gen))
            agreement = compare_record(record, reference_model)
            assert agreement.rows == record.shape[0] * record.shape[1] > 0
            lowest = min(lowest, agreement.min_cosine)
            assert agreement.min_cosine >= MIN_COSINE, agreement
        report(
            f"gguf capture vs HF fp32 ({tokens}, {dtype}, batch {batch})",
            f"min cosine {lowest:.5f}",
        )
        report(
            f"gguf token statistics vs HF fp32 ({tokens}, batch {batch})",
            f"{stats.tokens} tokens, max abs error: logprob {stats.logprob:.3f}, entropy "
            f"{stats.entropy:.3f}, top-20 logprobs {stats.topk:.3f}",
        )
        assert all(getattr(stats, name) < tol for name, tol in TOKEN_TOLERANCE.items()), stats
        if (
            batch == 1 and tokens == "all"
        ):  # the check can fail: the same rows against the next layer
            record = store[next(iter(store))]
            assert compare_record(record, reference_model, layer_shift=1).min_cosine < MIN_COSINE
            shifted = compare_token_stats(record, reference_model, shift=1)
            assert shifted.logprob > TOKEN_TOLERANCE["logprob"], shifted
            assert shifted.topk > TOKEN_TOLERANCE["topk"], shifted


def test_chat_template_matches_hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    lm = HalluLensGGUFLM(pretrained="smollm2")
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "Où est la gare ?"},
            {"role": "assistant", "content": "Tout droit."},
            {"role": "user", "content": "Merci — et le musée?"},
        ],
    ]
    for messages in conversations:
        for add in (True, False):
            ours = lm.apply_chat_template(messages, add_generation_prompt=add)
            theirs = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add
            )
            assert ours == theirs
    assert lm.tokenizer_name == "smollm2"


def test_loglikelihoods_match_hf(reference_model):
    lm = HalluLensGGUFLM(pretrained="smollm2")
    pairs = [("The capital of France is", " Paris"), ("One, two, three,", " four, five")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]
    ours = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (score, _) in zip(pairs, ours, strict=True):
        ctx = lm.tok_encode(context)
        cont = lm.tok_encode(continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(reference_model(ids).logits[0].double(), -1)
        want = sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert score == pytest.approx(want, abs=0.15 + 0.05 * abs(want))
    text = "The quick brown fox jumps over the lazy dog. " * 3
    [rolling] = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)],
        disable_tqdm=True,
    )
    tokens = [lm.eot_token_id, *lm.tok_encode(text, add_special_tokens=False)]
    with torch.no_grad():
        logprobs = torch.log_softmax(reference_model(torch.tensor([tokens])).logits[0].double(), -1)
    want = sum(logprobs[i, t].item() for i, t in enumerate(tokens[1:]))
    assert rolling == pytest.approx(want, rel=0.05)
    report("gguf loglikelihood_rolling vs HF fp32", f"{rolling:.3f} vs {want:.3f}")


def test_sampling_is_seeded_and_until_stops(chats):
    a = HalluLensGGUFLM(pretrained="smollm2", seed=7)
    b = HalluLensGGUFLM(pretrained="smollm2", seed=7)
    kwargs = {"until": ["."], "max_gen_toks": 20, "do_sample": True, "temperature": 1.0}
    request = Instance(request_type="generate_until", doc={}, arguments=(chats[2], kwargs), idx=0)
    [first] = a.generate_until([request], disable_tqdm=True)
    [second] = b.generate_until([request], disable_tqdm=True)
    assert first == second and "." not in first


@pytest.mark.slow
def test_stock_cli_generation_with_capture_and_loglikelihood(tmp_path):
    store_path, out = tmp_path / "acts.lmdb", tmp_path / "out"
    result = run_cli(
        "lm_eval",
        "--model",
        "hallulens-gguf",
        "--model_args",
        f"pretrained=smollm2,activations={store_path},n_ctx=1024",
        "--tasks",
        "hallulens_demo,capture_choice",
        "--include_path",
        str(TEST_TASKS),
        "--apply_chat_template",
        "--batch_size",
        "4",
        "--output_path",
        str(out),
        "--log_samples",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["capture_choice"]["acc,none"] >= 0.5
    assert "answer_mentioned,none" in results["results"]["hallulens_demo"]
    assert results["config"]["activations"] == str(store_path)
    [samples] = out.rglob("samples_hallulens_demo_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    with open_store(store_path) as store:
        checked = verify(store)
        assert len(store) == len(rows) == 8 and checked.bad == {} and checked.no_checksum == 0
        for row in rows:
            record = store[row["prompt_hash"]]
            assert record.response == row["resps"][0][0]
            assert record.backend == "gguf"
            assert np.asarray(record.layer_ids).tolist() == list(range(31))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"n_ctx": "big"}, "n_ctx='big' is not an integer"),
        ({"batch_size": 0}, "batch_size='0' must be at least 1"),
        ({"pretrained": "/nowhere/model.gguf"}, "pretrained=/nowhere/model.gguf"),
        ({"pretrained": "/nowhere/model.gguf", "activations": "x.lmdb"}, "not a readable GGUF"),
        ({"capture_layers": [31], "activations": "x.lmdb"}, "layer 31 is out of range"),
    ],
)
def test_bad_model_args_are_clear_errors(args, message):
    from hallulens_capture.errors import HalluLensError

    with pytest.raises(HalluLensError, match=re.escape(message)):
        HalluLensGGUFLM(**{"pretrained": "smollm2", **args})
