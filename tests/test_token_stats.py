"""The token-statistics reduction every engine uses, against float64 log_softmax and a full sort.

The engine tests compare records with an HF forward pass; these check the reduction itself on
logits an engine is unlikely to produce in a short run: vocabularies that do not fill the last
block, the maximum in that last block, masked (-inf) tokens, flat and peaked rows."""

from __future__ import annotations

import pytest
import torch

from hallulens_models import token_stats

K = 20


def reference(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """[n, 2 + 2k] rows computed in float64 with a full descending sort."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    finite = torch.where(torch.isinf(logp), torch.zeros_like(logp), logp)
    entropy = -(logp.exp() * finite).sum(-1, keepdim=True)
    order = logp.argsort(dim=-1, descending=True, stable=True)[:, :k]
    return torch.cat(
        [logp.gather(1, chosen[:, None]), entropy, logp.gather(1, order), order.double()], dim=1
    )


def reduced(
    x: torch.Tensor,
    chosen: torch.Tensor,
    index: torch.Tensor | None = None,
    reduction: token_stats.Reduction | None = None,
) -> torch.Tensor:
    """One step through a Reduction on the calling thread, as HF and vLLM on CUDA use it."""
    reduction = reduction or token_stats.Reduction(K, threaded=False)
    reduction.load(x, index)
    got: list[torch.Tensor] = []
    reduction.reduce(chosen, got.append)
    reduction.wait()  # a step of fewer rows than a block waits for more
    assert len(got) == 1
    return got[0].double()


def logits_rows(n: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=rng) * scale


@pytest.mark.parametrize("vocab", [30, 1000, 49152, 49153, 128256])
@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_rows_match_float64_reference(vocab: int, scale: float) -> None:
    x = logits_rows(5, vocab, scale, seed=vocab)
    x[1, vocab - 1] += 40  # the maximum in the last (partial) block
    x[2, 3] += 12  # one peaked row
    x[3, : min(vocab // 2, vocab - K)] = float("-inf")  # masked by a processor (k stay finite)
    chosen = torch.tensor([0, vocab - 1, 3, vocab - 2, vocab // 3])
    got = reduced(x, chosen)
    want = reference(x, chosen, K)
    assert (got[:, : 2 + K] - want[:, : 2 + K]).abs().max() < 2e-5
    assert torch.equal(got[:, 2 + K :], want[:, 2 + K :])  # ids: distinct values, exact order


def test_top_is_a_full_sort_prefix_for_every_row_count() -> None:
    for n in (1, 3, 16):
        x = logits_rows(n, 49152 + 77, 2.0, seed=n)
        values, ids = token_stats.top(x, K)
        full = x.sort(dim=-1, descending=True)
        assert torch.equal(values, full.values[:, :K])
        assert torch.equal(ids, full.indices[:, :K])


def test_picked_rows_and_a_changed_input_leave_the_statistics_alone() -> None:
    x = logits_rows(4, 4096, 1.5, seed=7)
    index = torch.tensor([2, 0])
    reduction = token_stats.Reduction(K, threaded=False)
    reduction.load(x, index)
    x.fill_(0.0)  # a sampler changing its logits in place after the copy
    chosen = torch.tensor([5, 9])
    want = reference(logits_rows(4, 4096, 1.5, seed=7)[index], chosen, K)
    handed: list[torch.Tensor] = []
    reduction.reduce(chosen, handed.append)
    reduction.wait()
    got = handed[0].double()
    assert (got[:, : 2 + K] - want[:, : 2 + K]).abs().max() < 2e-5
    assert torch.equal(got[:, 2 + K :], want[:, 2 + K :])


def test_one_reducer_over_steps_of_changing_size_and_dtype() -> None:
    """Kept buffers grow with the rows asked and follow the logits' dtype; each step's rows are
    read before the next step, as every engine does."""
    reduction = token_stats.Reduction(K, threaded=False)
    for step, (n, dtype) in enumerate(
        [(2, torch.float32), (16, torch.float32), (3, torch.bfloat16), (16, torch.bfloat16)]
    ):
        x = logits_rows(n + 1, 49152, 2.5, seed=step).to(dtype)
        index = torch.arange(n, 0, -1)  # every row but the first, reversed
        chosen = torch.arange(n) * 7
        got = reduced(x, chosen, index, reduction)
        want = reference(x[index].float(), chosen, K)
        assert (got[:, : 2 + K] - want[:, : 2 + K]).abs().max() < 2e-5, (n, dtype)
        # bfloat16 logits tie, and tied ids may come in any order: each id's own logprob
        logp = torch.log_softmax(x[index].double(), dim=-1)
        ids = got[:, 2 + K :].long()
        assert (logp.gather(1, ids) - got[:, 2 : 2 + K]).abs().max() < 2e-5, (n, dtype)
        assert all(len(set(row.tolist())) == K for row in ids)


def test_a_failed_call_leaves_nothing_for_the_next() -> None:
    """HF keeps one Reduction from call to call: the steps a failed call loaded, and reduced
    without handing them over, are dropped, neither passed on nor mixed into the next block."""
    reduction = token_stats.Reduction(K, threaded=False)
    stale: list[torch.Tensor] = []
    reduction.load(logits_rows(3, 4096, 2.0, seed=5))
    reduction.reduce(torch.tensor([1, 2, 3]), stale.append)
    reduction.load(logits_rows(3, 4096, 2.0, seed=6))  # the call failed before its tokens
    reduction.discard()
    x = logits_rows(4, 4096, 2.0, seed=7)
    chosen = torch.tensor([4, 5, 6, 7])
    got = reduced(x, chosen, reduction=reduction)
    want = reference(x, chosen, K)
    assert stale == []
    assert (got[:, : 2 + K] - want[:, : 2 + K]).abs().max() < 2e-5
    assert torch.equal(got[:, 2 + K :], want[:, 2 + K :])


@pytest.mark.parametrize("host", [False, True], ids=["torch", "numpy"])
@pytest.mark.parametrize("mode", ["helper thread", "calling thread", "engine threads"])
def test_reduction_hands_every_step_over_in_order(mode: str, host: bool) -> None:
    """Steps loaded then reduced (in blocks of steps whose buffer grows as they are loaded; off
    the calling thread, on it alone, or on it with its torch threads) arrive in order, each
    equal to the reference of its own logits, although the engine reuses its logits buffer as
    soon as `load` returns; a step loaded but never reduced is left out, and a failure in a
    step surfaces at `wait`. `host`: numpy rows and a list of ids, as llama.cpp hands them
    over."""
    reduction = token_stats.Reduction(
        K, threaded=mode == "helper thread", engine_threads=mode == "engine threads"
    )
    engine_buffer = torch.empty(9, 4096)
    got: list[torch.Tensor] = []
    wants = []
    for step in range(40):  # 180 rows: several blocks
        n = 1 + step % 8
        engine_buffer.copy_(logits_rows(9, 4096, 1.0 + step, seed=100 + step))
        index = torch.arange(n)
        chosen = torch.arange(n) * 3 + step
        wants.append(reference(engine_buffer[:n].clone(), chosen, K))
        if host:
            reduction.load(engine_buffer.numpy()[:n])
        else:
            reduction.load(engine_buffer, index)
        engine_buffer.fill_(float("nan"))  # the engine's next step overwrites it
        reduction.reduce(chosen.tolist() if host else chosen, got.append)
    # a step loaded whose sampling then failed: never reduced, it is left out of its block
    reduction.load(engine_buffer.numpy()[:3] if host else engine_buffer[:3])
    reduction.wait()
    assert len(got) == len(wants)
    for rows, want in zip(got, wants, strict=True):
        assert (rows.double()[:, : 2 + K] - want[:, : 2 + K]).abs().max() < 2e-5
        assert torch.equal(rows.double()[:, 2 + K :], want[:, 2 + K :])

    def broken(rows: torch.Tensor) -> None:
        raise OSError("the writer's disk is full")

    reduction.load(logits_rows(2, 4096, 1.0, seed=1))
    with pytest.raises(OSError, match="disk is full"):
        reduction.reduce(torch.tensor([0, 1]), broken)
        reduction.wait()
