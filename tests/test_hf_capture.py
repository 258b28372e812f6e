"""hallulens-hf on the real SmolLM2: stored activations against an independent forward pass."""

import gc

import numpy as np
import pytest
import torch
from conftest import report
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from reference import NO_TOKENS, compare_record, compare_token_stats

from hallulens_capture import open_store, record_key
from hallulens_capture.errors import CaptureConfigError, CaptureError, StoreError
from hallulens_capture.keys import share_of
from hallulens_capture.report import check_record
from hallulens_models import hf_lm, hf_tap
from hallulens_models.hf_lm import HalluLensHFLM

HF_TOKEN_ERROR = 2e-4  # measured up to 4e-5 (fp32 batched generate vs one fp32 forward)
PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea, the sky and the wind that moves over the waves:",
    "1, 2, 3,",
    "Owls are birds that",
]


def requests(prompts, max_gen_toks=16, until=("\n\n",)):
    kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
    return [
        Instance("generate_until", {}, (p, dict(kwargs)), i, ("probe", i, 1))
        for i, p in enumerate(prompts)
    ]


def backend(store, batch_size=1, **capture):
    return HalluLensHFLM(
        pretrained="smollm2",
        device="cpu",
        dtype="float32",
        batch_size=batch_size,
        activations=str(store),
        **capture,
    )


@pytest.fixture(scope="module")
def plain_outputs(smollm2_dir):
    """Generations of the unmodified harness HFLM, batch size 3."""
    lm = HFLM(pretrained=str(smollm2_dir), device="cpu", dtype="float32", batch_size=3)
    return lm.generate_until(requests(PROMPTS))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_float32_capture_equals_forward_pass(tmp_path, reference_model, plain_outputs, batch_size):
    lm = backend(tmp_path / "s", batch_size, capture_dtype="float32", capture_tokens="all")
    outputs = lm.generate_until(requests(PROMPTS))
    assert outputs == plain_outputs  # capture changes nothing the harness sees
    with open_store(tmp_path / "s") as store:
        assert len(store) == len(PROMPTS)
        lengths = {len(store[record_key(p)].prompt_token_ids) for p in PROMPTS}
        assert len(lengths) == len(PROMPTS)  # unequal prompts: left padding differs per row
        worst, tokens = 0.0, NO_TOKENS
        for prompt, text in zip(PROMPTS, outputs, strict=True):
            record = store[record_key(prompt)]
            assert record.response == text and record.prompt == prompt
            assert record.shape[0] == 31 and list(record.layer_ids) == list(range(31))
            agreement = compare_record(record, reference_model)
            assert agreement.rows == record.shape[1] * 31
            worst = max(worst, agreement.max_rel_error)
            assert check_record(record) == [] and record.capture_topk == 20
            # greedy decoding: every generated token is the top-1 alternative
            np.testing.assert_array_equal(record.topk_ids[:, 0], record.generated_token_ids)
            tokens = tokens.worst(compare_token_stats(record, reference_model))
    report(f"hf float32 capture, batch {batch_size}", f"max relative error {worst:.2e}")
    report(
        f"hf token statistics, batch {batch_size}",
        f"{tokens.tokens} tokens, max abs error: logprob {tokens.logprob:.1e}, entropy "
        f"{tokens.entropy:.1e}, top-20 logprobs {tokens.topk:.1e}",
    )
    assert worst < 1e-4
    assert max(tokens.logprob, tokens.entropy, tokens.topk) < HF_TOKEN_ERROR
    shifted = compare_token_stats(record, reference_model, shift=1)  # the check can fail
    assert shifted.logprob > 0.1 and shifted.topk > 0.1, shifted


@pytest.mark.parametrize("writers", ["1", "3"])
def test_float16_storage_cosine(tmp_path, reference_model, monkeypatch, writers):
    """Also with three writer threads (HALLULENS_CAPTURE_WRITERS): the records spread over the
    root and shards, read back as one store."""
    monkeypatch.setenv("HALLULENS_CAPTURE_WRITERS", writers)
    lm = backend(tmp_path / "s", 3, capture_dtype="float16", capture_tokens="all")
    lm.generate_until(requests(PROMPTS))
    with open_store(tmp_path / "s") as store:
        lowest = min(
            compare_record(store[record_key(p)], reference_model).min_cosine for p in PROMPTS
        )
        assert len(store) == len(PROMPTS)
        assert [s["name"] for s in store.shards()] == ([] if writers == "1" else ["w1", "w2"])
    report(f"hf float16 storage, batch 3, {writers} writer(s)", f"min cosine {lowest:.7f}")
    assert lowest >= 0.9999


@pytest.mark.parametrize(
    ("capture", "layers"),
    [
        ({"capture_layers": "0,8,16"}, [0, 8, 16]),
        ({"capture_layers": "-1", "capture_tokens": "prompt"}, [30]),
        (
            {"capture_layers": "-4--1", "capture_tokens": "all", "capture_dtype": "bfloat16"},
            [27, 28, 29, 30],
        ),
        ({"capture_layers": [10, 11, 12], "capture_dtype": "float32"}, [10, 11, 12]),
        (
            {"capture_tokens": "response", "capture_dtype": "float32", "capture_layers": "0,15,30"},
            [0, 15, 30],
        ),
    ],
)
def test_options_give_exactly_the_requested_shape(tmp_path, reference_model, capture, layers):
    lm = backend(tmp_path / "s", 2, **capture)
    lm.generate_until(requests(PROMPTS[:2], max_gen_toks=6))
    scope = capture.get("capture_tokens", "generated")
    label = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[
        capture.get("capture_dtype", "float16")
    ]
    with open_store(tmp_path / "s") as store:
        for prompt in PROMPTS[:2]:
            record = store[record_key(prompt)]
            n_prompt, n_gen = len(record.prompt_token_ids), len(record.generated_token_ids)
            first, tokens = {
                "prompt": (0, n_prompt),
                "generated": (n_prompt, n_gen - 1),
                "all": (0, n_prompt + n_gen - 1),
                "response": (n_prompt - 1, n_gen),  # one state per generated token
            }[scope]
            assert record.shape == (len(layers), tokens, 576)
            assert list(record.token_positions) == list(range(first, first + tokens))
            assert list(record.layer_ids) == layers
            assert record.storage_dtype == label and record.capture_tokens == scope
            assert compare_record(record, reference_model).min_cosine > 0.999


def test_repeated_prompts_get_suffixed_keys_and_resume_skips_them(tmp_path):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    lm = backend(tmp_path / "s", 2)
    first = lm.generate_until(requests(prompts))
    assert lm._capture.written == 3
    keys = [record_key(PROMPTS[0]), record_key(PROMPTS[2]), record_key(PROMPTS[0], 1)]
    with open_store(tmp_path / "s") as store:
        assert sorted(store) == sorted(keys)
        stamps = {k: store[k].timestamp for k in keys}
    again = backend(tmp_path / "s", 2)
    assert again.generate_until(requests(prompts)) == first
    assert again._capture.written == 0  # nothing generated twice
    with open_store(tmp_path / "s") as store:
        assert {k: store[k].timestamp for k in keys} == stamps
    other = backend(tmp_path / "s", 2, capture_tokens="all")
    with pytest.raises(StoreError, match="capture_tokens='generated' \\(now 'all'\\)"):
        other.generate_until(requests(prompts))


def test_a_batch_step_copies_are_freed_when_its_rows_are_written(tmp_path):
    """The step log holds a batch's hidden states (pinned memory on CUDA); it must be gone when
    generate returns, without waiting for the garbage collector: a log kept by a reference cycle
    made the next batch allocate (and on CUDA page-lock) its copies afresh."""
    lm = backend(tmp_path / "s", 2)
    gc.collect()
    gc.disable()
    try:
        lm.generate_until(requests(PROMPTS[:2]))
        # type(), not isinstance(): the latter reads __class__ of lazy module proxies (warnings)
        alive = [o for o in gc.get_objects() if issubclass(type(o), hf_tap.StepLog)]
    finally:
        gc.enable()
    assert lm._capture.written == 2
    assert alive == []


def test_a_row_ended_by_a_stop_string_leaves_while_generate_goes_on(tmp_path, monkeypatch):
    """Stop strings are looked for every STOP_EVERY steps: a row that ends on one is handed to
    the writer at most that many forward steps after the step that made its last token, before
    generate returns, and its record ends exactly at the token that completes the stop string."""
    lm = backend(tmp_path / "s", len(PROMPTS))
    forwards, handed = [0], {}
    lm.model.register_forward_pre_hook(lambda *args: forwards.__setitem__(0, forwards[0] + 1))
    finished = lm._finished

    def spy(context, response, sample):
        handed[context] = forwards[0]
        finished(context, response, sample)

    monkeypatch.setattr(lm, "_finished", spy)
    texts = lm.generate_until(requests(PROMPTS, until=(",",)))
    total, early = forwards[0], 0
    with open_store(tmp_path / "s") as store:
        for prompt, text in zip(PROMPTS, texts, strict=True):
            record = store[record_key(prompt)]
            generated = list(record.generated_token_ids)
            assert record.response == text and "," not in text
            if len(generated) < 16:  # ended by the stop string
                assert "," in lm.tok_decode(generated)
                assert "," not in lm.tok_decode(generated[:-1])
                assert handed[prompt] <= len(generated) + hf_lm.STOP_EVERY < total
                early += 1
    assert early >= 2  # the check can fail: rows must end early for it to say anything


def test_the_hooks_go_when_generate_ends_or_fails(tmp_path, monkeypatch):
    """Capture wraps the modules' `forward` only while it records: a call failing inside a
    forward step leaves the model as it was, with a forward an instance had already (as
    accelerate's hooks set one) put back, and the next call captures as before."""
    lm = backend(tmp_path / "s", 2)
    layer = hf_tap.decoder_layers(lm.model)[3]
    own = layer.forward
    layer.forward = own  # an instance's own forward

    def wrapped():
        return sorted(name for name, m in lm.model.named_modules() if "forward" in m.__dict__)

    before = wrapped()
    inside = []  # at the failure: was the model's forward wrapped (inside a step)?

    def failing(context, response, sample):
        inside.append("forward" in lm.model.__dict__)
        raise RuntimeError("the writer is gone")

    monkeypatch.setattr(lm, "_finished", failing)
    with pytest.raises(RuntimeError, match="the writer is gone"):  # "1, 2, 3," ends at a ","
        lm.generate_until(requests(PROMPTS[1:3], until=(",",)))
    assert inside == [True] and wrapped() == before and len(before) == 1
    assert layer.__dict__["forward"] is own
    monkeypatch.undo()
    lm.generate_until(requests(PROMPTS[::3]))
    assert lm._capture.written == 2 and wrapped() == before


def test_a_decode_step_that_skips_a_watched_layer_is_refused(tmp_path):
    """Decode steps keep the watched layers' outputs in the order the model runs them: a step
    that runs fewer of them (a model skipping layers) cannot be placed, and says so."""
    lm = backend(tmp_path / "s", 2)
    decoder = lm.model.get_decoder()
    layers = decoder.layers

    def skip_layer_20(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if ids.shape[1] == 1:  # a decode step
            decoder.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != 20])

    hook = lm.model.register_forward_pre_hook(skip_layer_20, with_kwargs=True)
    try:
        with pytest.raises(CaptureError, match="decode step 1 ran 30 of the 31 watched layers"):
            lm.generate_until(requests(PROMPTS[:2]))
    finally:
        hook.remove()
        decoder.layers = layers
    assert not any("forward" in m.__dict__ for m in lm.model.modules())
    assert lm._capture.written == 0


def test_loglikelihood_is_the_harness_own(smollm2_dir, tmp_path):
    pairs = [("Question: What is two plus two?\nAnswer:", " four"), ("The sky is", " blue")]
    reqs = [Instance("loglikelihood", {}, pair, i, ("ll", i, 1)) for i, pair in enumerate(pairs)]
    ours = backend(tmp_path / "s", 2).loglikelihood(reqs)
    plain = HFLM(
        pretrained=str(smollm2_dir), device="cpu", dtype="float32", batch_size=2
    ).loglikelihood(reqs)
    np.testing.assert_allclose([o[0] for o in ours], [p[0] for p in plain], rtol=1e-6)
    assert [o[1] for o in ours] == [p[1] for p in plain]


def test_bad_layer_fails_before_weights_load(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(HFLM, "_create_model", no_load)
    with pytest.raises(CaptureConfigError, match=r"layer 31 is out of range .* 30 decoder layers"):
        backend(tmp_path / "s", capture_layers="31")


def test_job_array_shares_then_one_run_without_capture_shard(tmp_path, plain_outputs):
    """Two jobs of an array each capture their share of the keys into their own shard and stop
    (exit 0) while the other share is missing; the run without capture_shard then generates
    nothing and answers every request from the store."""
    path = tmp_path / "s"
    keys = [record_key(p) for p in PROMPTS]
    for job in range(2):
        lm = backend(path, 3, capture_shard=f"{job}/2")
        if job == 0:
            with pytest.raises(SystemExit) as stopped:
                lm.generate_until(requests(PROMPTS))
            assert stopped.value.code == 0
        else:  # the last job finds every other share stored: it answers all
            assert lm.generate_until(requests(PROMPTS)) == plain_outputs
        lm._capture.close()
    with open_store(path) as store:
        shards = {s["name"]: s["records"] for s in store.shards()}
        assert shards == {f"job{j}": sum(share_of(k, 2) == j for k in keys) for j in range(2)}
        assert sorted(store) == sorted(keys) and store.conflicts() == {}
        assert [store[record_key(p)].response for p in PROMPTS] == plain_outputs
    final = backend(path, 3)
    assert final.generate_until(requests(PROMPTS)) == plain_outputs
    assert final._capture.written == 0


def test_token_statistics_off_and_a_store_from_before_them(tmp_path, capsys):
    """capture_topk=0 stores no token statistics; a store whose records predate them (no
    capture_topk field) is resumed only without them, and the refusal says so."""
    from hallulens_capture.record import TOKEN_STATS, encode_record
    from hallulens_capture.store import ActivationStore
    from hallulens_tasks.cli import main

    prompts = PROMPTS[:2]
    off = backend(tmp_path / "off", 2, capture_topk=0)
    texts = off.generate_until(requests(prompts))
    with open_store(tmp_path / "off") as store:
        records = [store[record_key(p)] for p in prompts]
        for record in records:
            assert record.capture_topk == 0 and check_record(record) == []
            assert all(record.tensor(name) is None for name in TOKEN_STATS)
            assert record.generated_logprobs is None and record.topk_ids is None
        # the same records as an earlier release wrote them: no capture_topk field
        with ActivationStore(tmp_path / "old", writable=True) as old:
            for record in records:
                meta = {k: v for k, v in record.metadata.items() if k != "capture_topk"}
                index = {name: getattr(record, name) for name in ("layer_ids", "token_positions")}
                index["prompt_token_ids"] = record.prompt_token_ids
                index["generated_token_ids"] = record.generated_token_ids
                acts = record.all_layers_activations
                old.put(record_key(record.prompt), encode_record(acts, "F16", index, meta))
    assert main(["activations", "show", record_key(prompts[0]), str(tmp_path / "old")]) == 0
    assert "token statistics: none (capture_topk=0)" in capsys.readouterr().out
    with pytest.raises(StoreError, match=r"predate token statistics: capture_topk=0 resumes it"):
        backend(tmp_path / "old", 2).generate_until(requests(prompts))
    resumed = backend(tmp_path / "old", 2, capture_topk=0)
    assert resumed.generate_until(requests(prompts)) == texts and resumed._capture.written == 0


def test_show_prints_the_token_statistics_and_verify_checks_them(tmp_path, capsys):
    from hallulens_capture.record import GENERATED_LOGPROBS, TOPK_LOGPROBS, encode_record
    from hallulens_capture.store import ActivationStore
    from hallulens_tasks.cli import main

    backend(tmp_path / "s", 1, capture_topk=5).generate_until(requests(PROMPTS[:1]))
    key = record_key(PROMPTS[0])
    assert main(["activations", "show", key, str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    with open_store(tmp_path / "s") as store:
        record = store[key]
        assert record.topk_ids.shape == (len(record.generated_token_ids), 5)
        lp, entropy = record.generated_logprobs, record.generated_entropy
        first = f"{record.generated_token_ids[0]:>6}  {lp[0]:>8.3f}  {entropy[0]:>7.3f}"
        assert "token statistics: top-5 per generated token" in out and first in out
        assert f"mean logprob {lp.mean():.3f}" in out
        # the same record with a generated token's logprob changed, and with the top-k unsorted
        index = {
            name: getattr(record, name)
            for name in ("layer_ids", "token_positions", "prompt_token_ids", "generated_token_ids")
        }
        stats = {name: record.tensor(name).copy() for name in record._tensors if "top" in name}
        stats[GENERATED_LOGPROBS] = lp - 0.5
        stats["generated_entropy"] = entropy
        unsorted = dict(stats, **{GENERATED_LOGPROBS: lp})
        unsorted[TOPK_LOGPROBS] = stats[TOPK_LOGPROBS][:, ::-1].copy()
        acts, meta = record.all_layers_activations, record.metadata
        bad = {"shifted": stats, "unsorted": unsorted}
        with ActivationStore(tmp_path / "bad", writable=True) as out_store:
            for name, optional in bad.items():
                value = encode_record(
                    acts, "F16", index, {**meta, "prompt": name}, optional=optional
                )
                out_store.put(record_key(name), value)
    assert main(["activations", "verify", str(tmp_path / "bad")]) == 1
    found = capsys.readouterr().out
    assert "generated_logprobs disagree with topk_logprobs" in found
    assert "topk_logprobs are not <= 0 and sorted" in found
