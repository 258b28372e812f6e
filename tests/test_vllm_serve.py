"""`vllm serve` + our plugin on 127.0.0.1: OpenAI-client requests end up in the store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import report
from reference import NO_TOKENS, compare_record, compare_token_stats

from hallulens_capture import open_store
from hallulens_capture.keys import record_key
from hallulens_models.vllm_handover import PREFIX, shared_memory

pytestmark = pytest.mark.slow
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(server: subprocess.Popen, port: int, log: Path, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
            client.models.list()
            return
        except (OSError, openai.APIError):
            time.sleep(1)
    pytest.fail(f"vllm serve did not come up in {limit} s:\n{log.read_text()[-3000:]}")


def listening(pid: int) -> dict[int, set[tuple[str, int]]]:
    """Listening TCP addresses of a process and its children."""
    root = psutil.Process(pid)
    out = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            conns = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        out[process.pid] = {(c.laddr.ip, c.laddr.port) for c in conns if c.status == "LISTEN"}
    return out


def test_vllm_serve_records_every_request(tmp_path, smollm2_dir, reference_model):
    from transformers import AutoTokenizer

    store_path, log, port = tmp_path / "served.lmdb", tmp_path / "serve.log", free_port()
    env = {
        "ACTIVATION_LMDB_PATH": str(store_path),
        "HALLULENS_CAPTURE_TOKENS": "all",
        "HALLULENS_CAPTURE_DTYPE": "float32",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    vllm = Path(sys.executable).parent / "vllm"
    command = [str(vllm), "serve", str(smollm2_dir), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.2"]
    command += ["--max-model-len", "512", "--served-model-name", "smollm2"]
    with log.open("w") as sink:
        server = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_until_up(server, port, log)
        sockets = listening(server.pid)
        workers = [f"{PREFIX}{p.pid}-" for p in psutil.Process(server.pid).children(True)]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ask = {"model": "smollm2", "max_tokens": 20, "temperature": 0}
        # the same chat twice: without, then with the client asking for logprobs
        plain_chat = client.chat.completions.create(messages=messages, **ask)
        chat = client.chat.completions.create(
            messages=messages, logprobs=True, top_logprobs=5, **ask
        )
        story = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 12}
        streamed = "".join(
            chunk.choices[0].text
            for chunk in client.completions.create(temperature=0, stream=True, **story)
        )
        streamed_logprobs = []  # the same, streamed with logprobs: one entry per token
        for chunk in client.completions.create(temperature=0, stream=True, logprobs=3, **story):
            streamed_logprobs += chunk.choices[0].logprobs.token_logprobs
        stopped = client.completions.create(
            model="smollm2", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"]
        )
        deadline = time.monotonic() + 30  # records are written after the responses
        while time.monotonic() < deadline:
            if store_path.exists():
                with open_store(store_path) as store:
                    if len(store) >= 5:
                        break
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(60)

    # vLLM force-kills the worker as the server stops: the server removes its directory
    assert not [e.name for e in os.scandir(shared_memory()) if e.name.startswith(tuple(workers))]
    # the front end listens only where it was told; engine processes only on loopback
    assert sockets[server.pid] == {("127.0.0.1", port)}
    assert all(ip == "127.0.0.1" for found in sockets.values() for ip, _ in found)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chat_prompt = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    with open_store(store_path) as store:
        assert len(store) == 5
        first, second = store[record_key(chat_prompt)], store[record_key(chat_prompt, 1)]
        text = plain_chat.choices[0].message.content
        assert first.response == second.response == chat.choices[0].message.content == text
        told = [entry.logprob for entry in chat.choices[0].logprobs.content]
        check_client_logprobs(second, told)
        top = chat.choices[0].logprobs.content[0].top_logprobs
        np.testing.assert_allclose([t.logprob for t in top], second.topk_logprobs[0, :5], atol=1e-4)
        tale, retold = (
            store[record_key("Once upon a time")],
            store[record_key("Once upon a time", 1)],
        )
        assert tale.response == retold.response == streamed and len(tale.generated_token_ids) == 12
        check_client_logprobs(retold, streamed_logprobs)
        counted = store[record_key("1, 2, 3, 4,")]
        assert counted.response == stopped.choices[0].text and " 7" not in counted.response
        assert " 7" in tokenizer.decode(counted.generated_token_ids)  # ends at the stop token
        worst, stats = 0.0, NO_TOKENS
        for key in store:
            record = store[key]
            assert record.backend == "vllm" and record.model == "smollm2"
            right = compare_record(record, reference_model)
            assert right.min_cosine >= 0.999 and right.max_rel_error < 1e-4, (key, right)
            assert compare_record(record, reference_model, layer_shift=1).min_cosine < 0.9
            tokens = compare_token_stats(record, reference_model)
            assert max(tokens.logprob, tokens.entropy, tokens.topk) < 3e-4, (key, tokens)
            worst, stats = max(worst, right.max_rel_error), stats.worst(tokens)
    report(
        "vllm serve capture",
        f"5 requests recorded, max rel error vs HF {worst:.2e}; token statistics max abs error "
        f"logprob {stats.logprob:.1e}, entropy {stats.entropy:.1e}, top-20 {stats.topk:.1e}",
    )


def check_client_logprobs(record, told: list[float]) -> None:
    """The logprobs vLLM gave the client are the record's: capture changed nothing it returns
    (the record's own agree with the HF pass), and the record has one per generated token."""
    assert len(told) == len(record.generated_token_ids)
    np.testing.assert_allclose(told, record.generated_logprobs, atol=1e-4)
