"""`hallulens-vllm` on vllm-cpu with SmolLM2: records against an independent HF forward pass.

Every engine here runs in float32 so the comparison measures the capture, not the kernels:
each stored (layer, token) row must match the HF row (max relative error asserted and
reported, cosine >= 0.999), and the same comparison one layer off must fail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

import numpy as np
import psutil
import pytest
from conftest import lm_eval_run, report
from reference import NO_TOKENS, compare_record, compare_token_stats

from hallulens_capture import open_store
from hallulens_capture.errors import HalluLensError

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM per in-process engine

ENGINE = "dtype=float32,gpu_memory_utilization=0.2,enforce_eager=True,max_model_len=128"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_REL_ERROR = 1e-4  # measured 1e-5 .. 3e-5 (fp32 engine vs fp32 HF)
TOKEN_ERROR = 3e-4  # token statistics vs the fp32 HF pass: measured max abs error 2e-5 .. 7e-5


def shut_down(lm) -> None:
    """Stop the engine's processes now (not at exit, after pytest closed its streams). vLLM's
    `kill_process_tree` asks each child its name before killing it: a worker that exits on its
    own in between raises NoSuchProcess there and leaves the rest running, so they are killed
    here."""
    client = lm.model.llm_engine.engine_core
    try:
        client.shutdown()
    except psutil.NoSuchProcess:
        for proc in client.resources.engine_manager.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                engine = psutil.Process(proc.pid)
                for process in [*engine.children(recursive=True), engine]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
        client.resources()


def check_against_hf(store, reference_model, name: str) -> None:
    """Activations and token statistics of every record against the HF pass; both checks
    also run one layer / one position off, where they must fail."""
    worst, lowest, rows, stats = 0.0, 1.0, 0, NO_TOKENS
    for key in store:
        record = store[key]
        tokens = compare_token_stats(record, reference_model)
        assert max(tokens.logprob, tokens.entropy, tokens.topk) < TOKEN_ERROR, (key, tokens)
        shifted = compare_token_stats(record, reference_model, shift=1)
        assert len(record.generated_token_ids) < 2 or shifted.logprob > 0.1, (key, shifted)
        # greedy decoding: each generated token is its step's most likely one
        np.testing.assert_array_equal(record.topk_ids[:, 0], record.generated_token_ids)
        stats = stats.worst(tokens)
        right = compare_record(record, reference_model)
        wrong = compare_record(record, reference_model, layer_shift=1)
        assert right.rows > 0 and right.min_cosine >= 0.999, (key, right)
        assert right.max_rel_error < MAX_REL_ERROR, (key, right)
        assert wrong.min_cosine < 0.9, (key, wrong)  # the check can fail
        worst, lowest, rows = (
            max(worst, right.max_rel_error),
            min(lowest, right.min_cosine),
            rows + right.rows,
        )
    report(
        name,
        f"{len(store)} records, {rows} rows: max rel error {worst:.2e}, min cos {lowest:.9f}; "
        f"{stats.tokens} tokens: max abs error logprob {stats.logprob:.1e}, entropy "
        f"{stats.entropy:.1e}, top-20 {stats.topk:.1e}",
    )


def test_stock_cli_capture_matches_hf_and_lines_up_with_hallulens_hf(tmp_path, reference_model):
    """Mixed prompt lengths, several samples, chunked prefill forced by a 16-token step budget;
    a loglikelihood task in the same run still works; hallulens-hf writes the same keys."""
    capture = "capture_tokens=all,capture_dtype=float32"
    runs = {}
    for model, extra in (
        ("hallulens-vllm", f"{ENGINE},max_num_batched_tokens=16"),
        ("hallulens-hf", "dtype=float32"),
    ):
        store_path = tmp_path / f"{model}.lmdb"
        results, samples = lm_eval_run(
            model,
            f"pretrained=smollm2,activations={store_path},{capture},{extra}",
            "capture_probe,capture_choice",
            tmp_path / model,
            "--apply_chat_template",
            "--limit",
            "8",
            "--batch_size",
            "4",
            env=ENV,
        )
        assert results["results"]["capture_choice"]["acc,none"] >= 0.5
        runs[model] = (store_path, samples["capture_probe"])

    store_path, samples = runs["hallulens-vllm"]
    with open_store(store_path) as store:
        assert len(store) == len(samples) == 8
        lengths = {len(store[k].prompt_token_ids) for k in store}
        assert len(lengths) > 1 and max(lengths) > 16  # unequal prompts, each split into chunks
        for row in samples:
            record = store[row["prompt_hash"]]
            assert record.response == row["resps"][0][0] and record.backend == "vllm"
            assert record.task == "capture_probe" and int(record.doc_id) == row["doc_id"]
        check_against_hf(store, reference_model, "hallulens-vllm (stock lm_eval, chunked prefill)")
        with open_store(runs["hallulens-hf"][0]) as hf:
            assert sorted(hf.keys()) == sorted(store.keys())
            for key in store:
                ours, theirs = store[key], hf[key]
                assert ours.prompt == theirs.prompt and ours.response == theirs.response
                np.testing.assert_array_equal(ours.prompt_token_ids, theirs.prompt_token_ids)
                np.testing.assert_array_equal(ours.generated_token_ids, theirs.generated_token_ids)
                np.testing.assert_array_equal(ours.token_positions, theirs.token_positions)
                a = ours.all_layers_activations.astype(np.float64)
                b = theirs.all_layers_activations.astype(np.float64)
                cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
                assert cos.min() >= 0.999, key


@pytest.fixture(scope="module")
def preempting_lm(tmp_path_factory):
    """An engine too small for its batch: 5 KV blocks of 32 tokens for 6 long generations."""
    from hallulens_models.vllm_lm import HalluLensVLLM

    path = tmp_path_factory.mktemp("vllm") / "acts.lmdb"
    lm = HalluLensVLLM(
        pretrained="smollm2",
        activations=str(path),
        capture_tokens="all",
        capture_dtype="float32",
        max_num_batched_tokens=16,
        num_gpu_blocks_override=5,
        block_size=32,
        batch_size="auto",
        dtype="float32",
        gpu_memory_utilization=0.2,
        enforce_eager=True,
        max_model_len=128,
    )
    yield lm, path
    shut_down(lm)


def generate(lm, prompts, max_gen_toks=40):
    from lm_eval.api.instance import Instance

    requests = [
        Instance(
            "generate_until",
            {},
            (p, {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False}),
            i,
        )
        for i, p in enumerate(prompts)
    ]
    return lm.generate_until(requests, disable_tqdm=True)


def test_preempted_requests_are_recomputed_once(preempting_lm, reference_model, caplog):
    lm, path = preempting_lm
    prompts = [
        f"Once upon a time, in a {place} far away, there lived {who}"
        for place, who in (
            ("kingdom", "a baker"),
            ("quiet mountain village", "an old clockmaker and his three curious grandchildren"),
            ("city", "a cat"),
            ("desert", "a traveller who collected maps of places that never existed"),
            ("forest", "a fox"),
            ("harbour town", "two sisters"),
        )
    ]
    with caplog.at_level(logging.INFO, logger="hallulens_models"):
        texts = generate(lm, prompts)
    assert re.search(r"\d+ captured rows were computed again after preemption", caplog.text)
    with open_store(path) as store:
        assert len(store) == len(prompts)
        for key in store:
            assert len(store[key].generated_token_ids) > 16  # long enough to need more blocks
        assert sorted(store[k].response for k in store) == sorted(texts)
        check_against_hf(store, reference_model, "hallulens-vllm (preemption + recompute)")


def free_files(directory: str) -> dict[int, str]:
    """inode -> name of the released hand-over files in a worker's directory."""
    from hallulens_models.vllm_handover import FREE, LOCK

    entries = list(os.scandir(directory))
    assert {e.name for e in entries if not e.name.startswith(FREE)} == {LOCK}  # none left in use
    return {e.inode(): e.name for e in entries if e.name.startswith(FREE)}


def worker_directories() -> list[str]:
    """The hand-over directories of this process's engine workers."""
    from hallulens_models.vllm_handover import PREFIX, shared_memory

    workers = tuple(f"{PREFIX}{p.pid}-" for p in psutil.Process().children(recursive=True))
    return [e.path for e in os.scandir(shared_memory()) if e.name.startswith(workers)]


def test_hand_over_files_are_reused_and_hold_only_the_new_rows(preempting_lm, reference_model):
    """The next call's requests write into the files the last call's released (a reused file
    keeps the rows of its last request wherever the new one writes none: the records must
    still match HF, also where preemption recomputes rows)."""
    lm, path = preempting_lm
    [directory] = worker_directories()
    generate(lm, [f"Name three {thing} and say why." for thing in ("birds", "tools")], 30)
    before = free_files(directory)
    assert before
    generate(lm, [f"A short note on {thing}" for thing in ("salt", "maps", "tea", "rope")], 36)
    after = free_files(directory)
    assert any(before.get(inode) not in (None, name) for inode, name in after.items())
    with open_store(path) as store:
        check_against_hf(store, reference_model, "hallulens-vllm (reused hand-over files)")


def test_a_full_hand_over_directory_fails_the_call_not_the_engine(
    tmp_path, reference_model, monkeypatch
):
    """A request whose rows do not fit where its worker hands them over (here: past a file size
    limit set on the worker, as on a full /dev/shm) fails its call with one error naming the
    file; the requests that finished with it and those still waiting are dropped, no file stays
    in use, the engine stays up and its next call is whole and matches HF."""
    from hallulens_capture.errors import CaptureError
    from hallulens_models import vllm_capture
    from hallulens_models.vllm_handover import PREFIX
    from hallulens_models.vllm_lm import HalluLensVLLM

    monkeypatch.setattr(vllm_capture, "HANDOVER_BYTES", 1)  # one hand-over call per request
    path = tmp_path / "acts.lmdb"
    others = set(worker_directories())  # of engines other tests keep
    lm = HalluLensVLLM(
        pretrained="smollm2",
        activations=str(path),
        capture_tokens="all",
        capture_dtype="float32",
        batch_size="auto",
        max_num_seqs=3,  # the long prompt (the harness sorts it first) runs with two others
        dtype="float32",
        gpu_memory_utilization=0.2,
        enforce_eager=True,
        max_model_len=128,
    )
    try:
        [directory] = set(worker_directories()) - others
        worker = psutil.Process(int(os.path.basename(directory)[len(PREFIX) :].split("-")[0]))
        # 4 MiB: 58 rows of 31 layers x 576 in float32 (Python ignores SIGXFSZ: pwrite fails)
        worker.rlimit(psutil.RLIMIT_FSIZE, (4 << 20, worker.rlimit(psutil.RLIMIT_FSIZE)[1]))
        short = [f"A short note on {thing}" for thing in ("salt", "maps", "tea")]
        long = "Describe " + ", ".join(["the rivers and the mountains of the north"] * 10)
        full = r"^cannot write captured rows to /\S+\.bin: File "
        # the long prompt, two that finish with it (their rows handed over after its), one waiting
        for prompts in ([short[0], long, *short[1:]], [short[0], long, short[1]]):
            with pytest.raises(CaptureError, match=full):
                generate(lm, prompts, 12)
            free_files(directory)  # none in use: the other requests' files went back too
        texts = generate(lm, short, 12)
        assert len(texts) == len(short)  # nothing of the failed calls comes back with this one
        free_files(directory)
        with open_store(path) as store:
            responses = [store[k].response for k in store]
            assert set(texts) <= set(responses) and len(responses) <= len(short) + 2
            check_against_hf(store, reference_model, "hallulens-vllm (after a full /dev/shm)")
    finally:
        shut_down(lm)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=2 cannot be used with activation"),
        ({"speculative_config": {"method": "ngram"}}, "speculative_config={'method': 'ngram'}"),
        ({"enable_prefix_caching": True}, "enable_prefix_caching=True cannot be used"),
        ({"worker_cls": "my.Worker"}, "worker_cls=my.Worker: capture needs"),
        ({"capture_layers": [31]}, "layer 31 is out of range"),
        ({"capture_tokns": "all"}, "capture_tokns='all'; did you mean capture_tokens?"),
        ({"pretrained": "/nowhere/model"}, "pretrained=/nowhere/model"),
    ],
)
def test_bad_model_args_fail_before_the_engine_starts(args, message):
    from hallulens_models.vllm_lm import HalluLensVLLM

    with pytest.raises(HalluLensError, match=re.escape(message)):
        HalluLensVLLM(**{"pretrained": "smollm2", "activations": "x.lmdb", **args})


def three_prompts_match_hf(
    tmp_path, reference_model, name: str, tokens: str = "all", **engine
) -> None:
    """Three short generations on a fresh engine; every record matches the HF pass."""
    from hallulens_models.vllm_lm import HalluLensVLLM

    path = tmp_path / "acts.lmdb"
    others = set(worker_directories())  # of engines other tests keep
    lm = HalluLensVLLM(
        pretrained="smollm2",
        activations=str(path),
        capture_tokens=tokens,
        capture_dtype="float32",
        dtype="float32",
        gpu_memory_utilization=0.2,
        max_model_len=256,
        batch_size=4,
        **engine,
    )
    try:
        texts = generate(lm, ["The capital of France is", "Count: 1, 2, 3,", "Name a fruit."], 12)
        directories = set(worker_directories()) - others
        assert len(directories) == 1  # the first rank's
    finally:
        shut_down(lm)
    assert not any(os.path.exists(d) for d in directories)  # the worker removed its files
    with open_store(path) as store:
        assert len(store) == 3  # one record per request, whatever the number of workers
        assert sorted(store[k].response for k in store) == sorted(texts)
        check_against_hf(store, reference_model, name)


def test_tensor_parallel_first_rank_keeps_the_rows(tmp_path, reference_model, monkeypatch):
    """SmolLM2's 9 heads split over 3 CPU ranks; only the first keeps rows."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0")  # 3 ranks on a 2-core machine
    three_prompts_match_hf(
        tmp_path,
        reference_model,
        "hallulens-vllm (tensor parallel 3)",
        tensor_parallel_size=3,
        enforce_eager=True,
    )


def test_capture_works_with_torch_compile(tmp_path, reference_model):
    """The aux outputs are part of the compiled graph (forward hooks would silently not fire)."""
    three_prompts_match_hf(
        tmp_path, reference_model, "hallulens-vllm (torch.compile)", enforce_eager=False
    )


def test_embedded_model_runs_with_default_engine_settings(tmp_path):
    """No gpu_memory_utilization and no VLLM_CPU_KVCACHE_SPACE: vLLM's own default (0.9 of RAM)
    does not fit a CPU machine that runs anything else; the backend picks a share that does."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "lm_eval"),
            "--model",
            "hallulens-vllm",
            "--model_args",
            "pretrained=smollm2,enforce_eager=True",
            "--tasks",
            "hallulens_demo",
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gpu_memory_utilization (the share of RAM it reserves) set to" in result.stderr
    assert "answer_mentioned" in result.stdout


def test_response_scope_holds_the_state_before_each_generated_token(tmp_path, reference_model):
    """capture_tokens=response: positions P-1 .. P+G-2, one state per generated token; the
    three prompts' prefill does not fit one 16-token step, so it is split over several."""
    three_prompts_match_hf(
        tmp_path,
        reference_model,
        "hallulens-vllm (response scope, chunked prefill)",
        tokens="response",
        enforce_eager=True,
        max_num_batched_tokens=16,
    )
    with open_store(tmp_path / "acts.lmdb") as store:
        for key in store:
            record = store[key]
            first = len(record.prompt_token_ids) - 1
            positions = list(range(first, first + len(record.generated_token_ids)))
            assert record.token_positions.tolist() == positions
