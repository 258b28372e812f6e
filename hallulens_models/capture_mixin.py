"""Harness-side capture shared by every hallulens-* backend.

The parent classes (HFLM, VLLM, ...) keep doing all the work of `generate_until`: batching,
sorting, stop strings, post-processing. This mixin wraps it: it skips requests whose record is
already stored (resume), and checks each output against its record through the harness's cache
hook, which every backend calls exactly once per output with `(context, gen_kwargs)`. The engine
glue hands over each generation as it finishes (`_finished()`: its prompt, the
response text the harness will return, the `CapturedSample`), so its record is written while the
engine goes on; the harness's outputs then confirm each record.

Several processes of one run (accelerate) each write their own shard; keys are numbered over
every process's requests, as one process would number them. A job of a job array
(`capture_shard=I/N`) captures its share of the keys and, while other shares are missing,
stops once its own is stored.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence

from hallulens_capture.errors import CaptureConfigError, CaptureError
from hallulens_capture.keys import digest_key, prompt_hash, share_of
from hallulens_capture.session import (
    CapturedSample,
    CaptureSession,
    SampleRequest,
    canonical_json,
    shard_name,
)
from hallulens_capture.spec import CaptureSpec
from hallulens_models.harness_cli import join_harness_cli

# model_args every hallulens-* backend takes, in CaptureSpec.from_model_args order
CAPTURE_ARGS = (
    "activations",
    "capture_layers",
    "capture_tokens",
    "capture_dtype",
    "map_size_gb",
    "capture_shard",
    "capture_topk",
)

log = logging.getLogger(__name__)


class _OutputRouter:
    """Stands in for the cache hook during one `generate_until`, pairing generations with records.

    The engine glue reports each generation as it finishes (`finished`, in any order, with the
    response text the harness will return for it), so its record is written while the engine
    goes on with the rest. The request it answers is known when every waiting request with its
    prompt has the same settings (the first one is taken, as keys number such requests in
    order); otherwise, or when the glue cannot know the harness's text (None), the sample waits
    for the harness's output, whose settings and text complete it. Each harness output
    (`add_partial`) must find a record of its prompt with its response text: anything else is
    a bug of ours and stops the run.
    """

    def __init__(
        self, session: CaptureSession, hook, requests: list[SampleRequest], keys: list[str]
    ):
        self._session = session
        self._hook = hook
        self._requests = requests
        self._keys = keys
        self._waiting: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            self._waiting[request.prompt].append(i)
        self._written: Counter[tuple[str, str]] = Counter()  # (prompt, response) -> records
        # (prompt, response or None) -> samples waiting for their harness output
        self._held: dict[tuple[str, str | None], list[CapturedSample]] = defaultdict(list)

    def finished(self, context: str, response: str | None, sample: CapturedSample) -> None:
        waiting = self._waiting.get(context)
        if not waiting:
            raise CaptureError("the engine finished a generation this call did not ask for")
        settings = {canonical_json(self._requests[i].gen_kwargs) for i in waiting}
        if response is not None and len(settings) == 1:
            i = waiting.pop(0)
            self._session.write(self._keys[i], self._requests[i], response, sample)
            self._written[(context, response)] += 1
        else:  # the harness's output settings will tell
            self._held[(context, response)].append(sample)

    @property
    def unmatched(self) -> int:
        """Samples no harness output has claimed (0 once every output came)."""
        return sum(self._written.values()) + sum(map(len, self._held.values()))

    def _claim(self, context: str, gen_kwargs: dict) -> int | None:
        waiting = self._waiting.get(context)
        if not waiting:
            return None
        wanted = canonical_json(gen_kwargs)
        at = next(
            (
                j
                for j, i in enumerate(waiting)
                if canonical_json(self._requests[i].gen_kwargs) == wanted
            ),
            0,
        )
        return waiting.pop(at)

    def add_partial(self, attr: str, req, res) -> None:
        self._hook.add_partial(attr, req, res)
        if attr != "generate_until":
            return
        context, gen_kwargs = req
        if self._written[(context, res)]:
            self._written[(context, res)] -= 1
            return
        held = self._held.get((context, res)) or self._held.get((context, None))
        i = self._claim(context, gen_kwargs) if held else None
        if i is None:
            raise CaptureError(
                "captured activations do not line up with the harness's outputs (no captured "
                "generation of this prompt gave this response)"
            )
        self._session.write(self._keys[i], self._requests[i], res, held.pop(0))  # type: ignore[union-attr]

    def __getattr__(self, name: str):
        return getattr(self._hook, name)


def _refuse_misspelled(kwargs: dict) -> None:
    """A model_arg that looks like a capture option but is none would be passed on to the engine
    (llama.cpp takes any keyword, transformers fails after loading the weights): stop now."""
    for name in kwargs:
        close = difflib.get_close_matches(name, CAPTURE_ARGS, n=1, cutoff=0.75)
        if name not in CAPTURE_ARGS and (name.startswith("capture") or close):
            hint = f"; did you mean {close[0]}?" if close else ""
            raise CaptureConfigError(
                f"unknown capture option {name}={kwargs[name]!r}{hint} "
                f"(capture options: {', '.join(CAPTURE_ARGS)})"
            )


class CaptureMixin:
    """Put before the harness LM class in the bases: `class X(CaptureMixin, HFLM)`."""

    _capture: CaptureSession | None = None
    _router: _OutputRouter | None = None

    @staticmethod
    def _capture_spec(kwargs: dict) -> CaptureSpec | None:
        """Take the capture model_args out of `kwargs`, checked before any weights load; None
        when capture is off. Also joins our logs and errors to the harness CLI's."""
        join_harness_cli()
        _refuse_misspelled(kwargs)
        return CaptureSpec.from_model_args(*(kwargs.pop(name, None) for name in CAPTURE_ARGS))

    def _start_capture(
        self, spec: CaptureSpec, layer_ids: Sequence[int], model: str, backend: str
    ) -> None:
        """Open the record writer, in this process's own shard when the run has several."""
        rank, world_size = getattr(self, "rank", 0), getattr(self, "world_size", 1)
        shard = shard_name(spec.shard, rank, world_size)
        session = CaptureSession(spec, layer_ids, model, backend, shard=shard)
        self._capture = session
        log.info("capturing activations into %s: %s", spec.path, session.info())

    @property
    def capturing(self) -> bool:
        """True while a `generate_until` with capture is running (engine glue checks this)."""
        return self._router is not None

    def get_model_info(self) -> dict:
        """The parent's model info (if it has any) plus the capture settings, for results."""
        parent = getattr(super(), "get_model_info", None)
        info = parent() if parent is not None else {}
        if self._capture is not None:
            info.update(self._capture.info())
        return info

    def _finished(self, context: str, response: str | None, sample: CapturedSample) -> None:
        """One finished generation: its prompt, the text the harness will return (None: not
        known before the harness returns it), the capture."""
        if self._router is None:
            raise CaptureError("activations captured outside generate_until")
        self._router.finished(context, response, sample)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        session = self._capture
        if session is None or not requests:
            return super().generate_until(requests, disable_tqdm)  # type: ignore[misc]
        if getattr(self.cache_hook, "dbdict", None) is not None:  # type: ignore[attr-defined]
            log.warning(
                "--use_cache is on: requests answered from the harness cache never reach the model "
                "and get no activation record; the store itself already resumes runs"
            )
        several = getattr(self, "world_size", 1) > 1
        real, copies = _without_padding(requests) if several else (list(range(len(requests))), {})
        instances = [requests[i] for i in real]
        samples = [
            SampleRequest(r.args[0], dict(r.args[1]), r.task_name, r.doc_id) for r in instances
        ]
        keys, results = session.plan(samples, _keys_over_ranks(instances) if several else None)
        missing = [i for i, text in enumerate(results) if text is None]
        job = session.spec.shard
        todo = [i for i in missing if job is None or share_of(keys[i], job[1]) == job[0]]
        if len(missing) < len(samples):
            log.warning(
                "resuming: %d of %d generations already in %s are not run again",
                len(samples) - len(missing),
                len(samples),
                session.spec.path,
            )
        if todo:
            router = _OutputRouter(
                session, self.cache_hook, [samples[i] for i in todo], [keys[i] for i in todo]
            )  # type: ignore[attr-defined]
            hook, self.cache_hook, self._router = self.cache_hook, router, router  # type: ignore[attr-defined]
            try:
                texts = super().generate_until([instances[i] for i in todo], disable_tqdm)  # type: ignore[misc]
            finally:
                self.cache_hook, self._router = hook, None  # type: ignore[attr-defined]
                session.flush()  # what was captured is kept, also when generation failed
            if router.unmatched:
                raise CaptureError(f"{router.unmatched} captured samples had no harness output")
            for i, text in zip(todo, texts, strict=True):
                results[i] = text
        session.finish()
        log.info("activation store %s: %d records written", session.spec.path, session.written)
        if len(todo) < len(missing):
            _stop_job(session, len(todo), len(missing) - len(todo))
        answers = dict(zip(real, results, strict=True))
        return [answers[copies.get(i, i)] for i in range(len(requests))]  # type: ignore[misc]


def _without_padding(requests) -> tuple[list[int], dict[int, int]]:
    """The requests to answer, and the copies the harness adds to even out the ranks' request
    counts (the last Instance again, beyond its `repeats`) -> the request whose answer each
    gets: a copy is neither generated nor captured (it would be a second record of one sample)."""
    seen: dict[int, list[int]] = {}
    real, copies = [], {}
    for i, request in enumerate(requests):
        earlier = seen.setdefault(id(request), [])
        if len(earlier) < getattr(request, "repeats", 1):
            earlier.append(i)
            real.append(i)
        else:
            copies[i] = earlier[(i - earlier[0]) % len(earlier)]
    return real, copies


def _keys_over_ranks(instances) -> list[str]:
    """Record keys of this rank's requests, numbered over every rank's requests in the order one
    process would get them (task, doc, sample), so a prompt in docs of two ranks gets the keys
    it would get in one process. A collective call: every rank gets here once per request type
    (the harness's own barrier after each type needs the same)."""
    import torch.distributed as dist

    per_doc: Counter = Counter()
    mine = []
    for r in instances:
        n = per_doc[(r.task_name, r.doc_id)]
        per_doc[(r.task_name, r.doc_id)] += 1
        mine.append((str(r.task_name), -1 if r.doc_id is None else int(r.doc_id), n))
    hashes = [prompt_hash(r.args[0]) for r in instances]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, hashes))
    tasks: dict[str, int] = {}  # task order as the harness runs tasks (rank 0 has every task)
    for rank_mine, _ in everyone:
        for task, _, _ in rank_mine:
            tasks.setdefault(task, len(tasks))
    union = sorted(
        ((tasks[t], d, n), h)
        for rank_mine, rank_hashes in everyone
        for (t, d, n), h in zip(rank_mine, rank_hashes, strict=True)
    )
    seen: Counter[str] = Counter()
    key_of = {}
    for place, digest in union:
        key_of[place] = digest_key(digest, seen[digest])
        seen[digest] += 1
    return [key_of[(tasks[t], d, n)] for t, d, n in mine]


def _stop_job(session: CaptureSession, written: int, others: int) -> None:
    """End a job-array job whose share is stored while other shares are still missing: the
    harness's results would count those as unanswered. Exit status 0: the job did its part."""
    index, count = session.spec.shard  # type: ignore[misc]
    log.warning(
        "capture_shard=%d/%d: this job's %d generations are in %s; %d belong to the other jobs "
        "and are not in the store yet. Once every job has finished, run the same command "
        "without capture_shard: it generates nothing stored and writes the harness's results.",
        index,
        count,
        written,
        session.spec.path,
        others,
    )
    raise SystemExit(0)
