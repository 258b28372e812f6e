"""Judge pass: our batched pass (keep-alive connections, one pool for the whole task) vs.
upstream HalluLens' design (a thread pool calling one request at a time, a new client and
connection per call), against the same local OpenAI-compatible server and the same items;
plus a re-run answered from the judge cache."""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import save, side_by_side, table, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from judge_server import JudgeServer

from hallulens_tasks.judging.judge import Judge
from hallulens_tasks.judging.scoring import SCORINGS
from hallulens_tasks.judging.settings import JudgeSettings
from hallulens_tasks.llm.spec import LLMSpec
from hallulens_tasks.prompting import render

WORKERS = 16


def judge_items(n: int):
    family = SCORINGS["nonsense_mixed_entities"]
    docs = [
        {"prompt": f"What is the animal Xus y{i}?", "name": f"Xus y{i}", "type": "animal"}
        for i in range(n)
    ]
    return [
        family.items(doc, f"It is a small beetle number {i}.")["belief"]
        for i, doc in enumerate(docs)
    ]


def upstream(base_url: str, prompts: list[str]) -> list[str]:
    def one(prompt: str) -> str:  # a fresh client (connection) for every call, as upstream
        body = json.dumps(
            {
                "model": "judge",
                "temperature": 0.0,
                "max_tokens": 512,
                "messages": [{"role": "user", "content": prompt}],
            }
        ).encode()
        request = urllib.request.Request(
            base_url + "/chat/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read())["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(one, prompts))


def case(n: int, delay_s: float, repeats: int) -> dict:
    items = judge_items(n)
    prompts = [render(i.template, **i.values) for i in items]
    with JudgeServer(lambda p: '{"does_believe": true}', delay_s=delay_s) as server:
        spec = LLMSpec("openai", "judge")
        settings = JudgeSettings(spec, base_url=server.base_url, concurrency=WORKERS)
        ours_s, upstream_s = side_by_side(
            lambda: Judge(settings).run(items), lambda: upstream(server.base_url, prompts), repeats
        )
        with tempfile.TemporaryDirectory() as tmp:
            cached = JudgeSettings(
                spec, base_url=server.base_url, concurrency=WORKERS, cache_path=Path(tmp) / "c"
            )
            fresh_s = timed(lambda: Judge(cached).run(items))
            rerun_s = timed(lambda: Judge(cached).run(items))
    return {
        "items": n,
        "server_delay_ms": delay_s * 1000,
        "ours_s": ours_s,
        "upstream_s": upstream_s,
        "ours_over_upstream": ours_s / upstream_s,
        "fresh_with_cache_s": fresh_s,
        "rerun_from_cache_s": rerun_s,
    }


def run(quick: bool = False) -> list[dict]:
    n, repeats = (200, 3) if quick else (800, 5)
    return [case(n, 0.0, repeats), case(n, 0.02, repeats)]


if __name__ == "__main__":
    results = run("--quick" in sys.argv)
    print(
        table(
            f"judge pass, {WORKERS} concurrent requests: ours (batched, keep-alive) ÷ upstream "
            "(thread pool, new connection per call); re-run from the judge cache",
            ["items", "server ms/req", "ours s", "upstream s", "ours÷upstream", "cached re-run s"],
            [
                [
                    r["items"],
                    r["server_delay_ms"],
                    r["ours_s"],
                    r["upstream_s"],
                    r["ours_over_upstream"],
                    r["rerun_from_cache_s"],
                ]
                for r in results
            ],
        )
    )
    print(save("judge", {"cases": results}))
