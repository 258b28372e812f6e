"""A harness LM on llama-cpp-python, in process (the base of `hallulens-gguf`).

The harness's own `gguf` model is an HTTP client without chat templates; this one loads the GGUF
with llama-cpp-python and implements generation (greedy or sampled, `until`, `max_gen_toks`),
`loglikelihood`, `loglikelihood_rolling` and the GGUF's own chat template. Decoding goes
through llama.cpp's batch API directly (the high-level `Llama` sampler cannot hand us the
logits of every position); `batch_size` sequences decode together, one llama.cpp sequence each.
An optional `DecodeObserver` is told about every decode call and every finished generation;
activation capture is one (see `llama_tap`), this module knows nothing of it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hallulens_capture.errors import CaptureConfigError, ModelFilesError
from hallulens_capture.options import checked_number
from hallulens_capture.positions import ends_response
from hallulens_models.chat_template import ChatTemplate
from hallulens_models.embedded import resolve_gguf

PROMPT, GENERATED = "prompt", "generated"  # what a decode call feeds (None: scoring)


class DecodeObserver(Protocol):
    """Watches LlamaCppLM decode. `feeding`/`fed` wrap every llama.cpp decode call with what it
    feeds: PROMPT (one sequence's prompt, which starts that sequence afresh), GENERATED (the last
    token of each active sequence) or None (loglikelihood scoring). `chose` gets the tokens each
    step of a generation chose with the logits rows they were chosen from (float32 [n, vocab],
    valid only during the call), `finished` each generation once it is complete, with the text
    the harness gets for it."""

    eval_callback: Any  # llama.cpp's `cb_eval` for the context, or None
    all_prompt_logits: bool  # ask the logits of every prompt token (llama.cpp then computes
    # its last layer for all of them; otherwise only for the last prompt token)

    def feeding(self, part: str | None) -> None: ...

    def fed(self, part: str | None, seqs: Sequence[int]) -> None: ...

    def chose(self, seqs: Sequence[int], logits: np.ndarray, tokens: Sequence[int]) -> None: ...

    def finished(
        self, seq: int, context: str, prompt: list[int], generated: list[int], text: str
    ) -> None: ...


@contextlib.contextmanager
def _context_params(callback, n_seq: int) -> Iterator[None]:
    """Give the next llama.cpp context `cb_eval` and room for `n_seq` sequences decoded together
    in one shared KV cache (Llama() has no arguments for either)."""
    from llama_cpp import llama_cpp as llama_lib

    original = llama_lib.llama_context_default_params

    def patched():
        params = original()
        if callback is not None:
            params.cb_eval = callback
            params.cb_eval_user_data = None
        params.n_seq_max = n_seq
        params.kv_unified = True
        return params

    llama_lib.llama_context_default_params = patched
    try:
        yield
    finally:
        llama_lib.llama_context_default_params = original


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class LlamaCppLM(TemplateLM):
    """The harness LM over llama-cpp-python; `HalluLensGGUFLM` adds capture on top."""

    def __init__(
        self,
        pretrained: str = "smollm2",
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 1234,
        max_gen_toks: int = 256,
        batch_size: object = 1,
        observer: DecodeObserver | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        self._observer = observer
        kwargs.pop("device", None)  # the harness passes it; llama.cpp uses n_gpu_layers
        kwargs.pop("max_batch_size", None)
        from llama_cpp import Llama

        path = resolve_gguf(pretrained)
        self._name = pretrained
        self._n_seq = _batch_size(batch_size)
        self._n_ctx = _int("n_ctx", n_ctx, 16)  # per sequence
        seed = _int("seed", seed, 0)
        try:
            with _context_params(observer.eval_callback if observer else None, self._n_seq):
                self._llm = Llama(
                    model_path=path,
                    n_ctx=self._n_ctx * self._n_seq,  # one shared KV cache for the batch
                    n_batch=_int("n_batch", n_batch, 1),
                    n_threads=None if n_threads is None else _int("n_threads", n_threads, 1),
                    n_gpu_layers=_int("n_gpu_layers", n_gpu_layers, -1),
                    seed=seed,
                    verbose=False,
                    **kwargs,
                )
        except ValueError as exc:
            raise ModelFilesError(f"pretrained={path}: llama.cpp cannot load it: {exc}") from None
        # free llama.cpp before interpreter shutdown tears its bindings down
        weakref.finalize(self, self._llm.close)
        for needed in ("_ctx", "_batch", "_model", "input_ids"):
            if not hasattr(self._llm, needed):
                raise CaptureConfigError(
                    "this llama-cpp-python lacks Llama." + needed + ": tested with 0.3.36"
                )
        self._n_vocab = self._llm.n_vocab()
        self._rng = np.random.default_rng(seed)
        self.max_gen_toks = _int("max_gen_toks", max_gen_toks, 1)
        self._template = ChatTemplate.from_metadata(self._llm.metadata, self._token_text)
        self._add_bos = self._llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self._eog = {t for t in range(self._n_vocab) if self._is_eog(t)}

    # --- tokens ------------------------------------------------------------------------
    def _is_eog(self, token: int) -> bool:
        from llama_cpp import llama_cpp as llama_lib

        return bool(llama_lib.llama_vocab_is_eog(self._llm._model.vocab, token))

    def _token_text(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    @property
    def eot_token_id(self) -> int:
        return self._llm.token_eos()

    @property
    def max_length(self) -> int:
        return self._n_ctx

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        add_bos = self._add_bos if add_special_tokens is None else add_special_tokens
        return self._llm.tokenize(string.encode("utf-8"), add_bos=add_bos, special=True)

    def tok_decode(self, tokens) -> str:
        return self._llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    # --- chat templates ----------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template.source if self._template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self._template is None:
            raise CaptureConfigError(f"{self._name} has no tokenizer.chat_template in its GGUF")
        return self._template.render(chat_history, add_generation_prompt=add_generation_prompt)

    # --- decoding ----------------------------------------------------------------------
    def _feed(
        self,
        tokens: list[int],
        positions,
        seqs: list[int],
        outputs: list[bool],
        part: str | None,
        copy: bool = True,
    ) -> np.ndarray:
        """Decode `tokens` (at `positions` of sequences `seqs`), n_batch at a time; returns the
        logits rows of the tokens flagged in `outputs`, in order. With `copy=False` the rows of
        the last decode call are llama.cpp's own buffer (no copy of a vocabulary-sized row),
        valid until the next decode; earlier calls' rows are copied."""
        if self._observer is not None:
            self._observer.feeding(part)
        llm = self._llm
        batch = llm._batch.batch
        rows = []
        for i in range(0, len(tokens), llm.n_batch):
            end = min(len(tokens), i + llm.n_batch)
            batch.n_tokens = end - i
            for k, j in enumerate(range(i, end)):
                batch.token[k] = tokens[j]
                batch.pos[k] = positions[j]
                batch.seq_id[k][0] = seqs[j]
                batch.n_seq_id[k] = 1
                batch.logits[k] = outputs[j]
            llm._ctx.decode(llm._batch)
            n_out = sum(outputs[i:end])
            if n_out:
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_out, self._n_vocab))
                rows.append(logits.copy() if copy or end < len(tokens) else logits)
        if self._observer is not None:
            self._observer.fed(part, seqs)
        if len(rows) == 1:
            return rows[0]
        return np.concatenate(rows) if rows else np.empty((0, self._n_vocab), np.float32)

    def _prefill(
        self, seq: int, tokens: list[int], all_logits: bool, part: str | None, copy: bool = True
    ) -> np.ndarray:
        """Start sequence `seq` afresh with `tokens`; logits of every token or only the last."""
        self._llm._ctx.kv_cache_seq_rm(seq, 0, -1)
        outputs = [all_logits] * (len(tokens) - 1) + [True]
        return self._feed(tokens, range(len(tokens)), [seq] * len(tokens), outputs, part, copy)

    def _next_tokens(self, logits: np.ndarray, gen_kwargs: dict) -> list[int]:
        """One token per logits row: the argmax (greedy), or drawn as `gen_kwargs` say."""
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0) or temperature <= 0:
            return logits.argmax(axis=1).tolist()
        return [self._sample(row, temperature, gen_kwargs) for row in logits]

    def _sample(self, logits: np.ndarray, temperature: float, gen_kwargs: dict) -> int:
        probs = np.exp(_log_softmax(logits.astype(np.float64) / temperature))
        top_k = int(gen_kwargs.get("top_k", 0) or 0)
        if 0 < top_k < len(probs):
            probs[probs < np.partition(probs, -top_k)[-top_k]] = 0
        top_p = float(gen_kwargs.get("top_p", 1.0) or 1.0)
        if top_p < 1.0:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < top_p
            probs[order[~keep]] = 0
        return int(self._rng.choice(len(probs), p=probs / probs.sum()))

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Generate for several prompts with the same settings, decoded together (one llama.cpp
        sequence each); a sequence leaves the batch at EOS, a stop string or its token limit,
        and is handed to the observer then."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [s for s in ([until] if isinstance(until, str) else until) if s]
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        prompts = [self.tok_encode(c)[-max(1, self.max_length - max_new) :] for c in contexts]
        all_logits = self._observer is not None and self._observer.all_prompt_logits
        generated: list[list[int]] = [[] for _ in prompts]
        texts: list[str] = [""] * len(prompts)

        def step(seqs: list[int], logits: np.ndarray) -> list[int]:
            """Choose each sequence's next token; the sequences still generating."""
            tokens = self._next_tokens(logits, kwargs)
            if self._observer is not None:
                self._observer.chose(seqs, logits, tokens)
            going = []
            for seq, token in zip(seqs, tokens, strict=True):
                out = generated[seq]
                out.append(token)
                if (
                    ends_response(out, self._eog, until, self.tok_decode)
                    or len(out) >= max_new
                    or len(prompts[seq]) + len(out) >= self.max_length
                ):
                    texts[seq] = self._text(out, until)
                    if self._observer is not None:
                        self._observer.finished(seq, contexts[seq], prompts[seq], out, texts[seq])
                else:
                    going.append(seq)
            return going

        active = []
        for seq, prompt in enumerate(prompts):
            logits = self._prefill(seq, prompt, all_logits, PROMPT, copy=False)[-1:]
            active += step([seq], logits)
        while active:
            positions = [len(prompts[seq]) + len(generated[seq]) - 1 for seq in active]
            tokens = [generated[seq][-1] for seq in active]
            rows = self._feed(
                tokens, positions, active, [True] * len(active), GENERATED, copy=False
            )
            active = step(active, rows)
        return texts

    def _text(self, generated: list[int], until: list[str]) -> str:
        """The harness's answer for these tokens: end-of-generation tokens dropped, cut at the
        first stop string."""
        text = self.tok_decode([t for t in generated if t not in self._eog])
        for stop in until:
            text = text.split(stop)[0]
        return text

    # --- the harness API ---------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests in order, up to `batch_size` consecutive ones with equal settings at once."""
        out: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until")
        i = 0
        while i < len(requests):
            gen_kwargs = requests[i].args[1]
            chunk = [requests[i]]
            while (
                len(chunk) < self._n_seq
                and i + len(chunk) < len(requests)
                and requests[i + len(chunk)].args[1] == gen_kwargs
            ):
                chunk.append(requests[i + len(chunk)])
            contexts = [r.args[0] for r in chunk]
            for context, text in zip(contexts, self._generate(contexts, gen_kwargs), strict=True):
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            i += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for cache_key, context_enc, continuation_enc in tqdm(
            requests, disable=disable_tqdm, desc="Running loglikelihood"
        ):
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            n_cont = len(continuation_enc)
            logits = self._prefill(0, tokens[:-1], all_logits=True, part=None)[-n_cont:]
            logprobs = _log_softmax(logits.astype(np.float64))
            target = np.asarray(tokens[-n_cont:])
            total = float(logprobs[np.arange(n_cont), target].sum())
            greedy = bool((logprobs.argmax(axis=-1) == target).all())
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, (total, greedy))
            out.append((total, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="Running loglikelihood_rolling"):
            (string,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens(
                [(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True
            )
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def get_model_info(self) -> dict:
        return {"model": self._name, "backend": "llama.cpp"}


def _int(name: str, value: object, minimum: int) -> int:
    return checked_number(name, value, minimum=minimum, integer=True)  # type: ignore[return-value]


def _batch_size(value: object) -> int:
    """The harness's `--batch_size` as the number of sequences decoded together."""
    text = str(value).split(":")[0]
    return 8 if text == "auto" else _int("batch_size", text, 1)
