"""`hallulens-gguf`: a harness LM on llama-cpp-python, in process, with activation capture.

The harness's own `gguf` model is an HTTP client without chat templates; this one loads the GGUF
with llama-cpp-python and implements generation (greedy or sampled, `until`, `max_gen_toks`),
`loglikelihood`, `loglikelihood_rolling` and the GGUF's own chat template. Decoding goes
through llama.cpp's batch API directly (the high-level `Llama` sampler cannot hand us the
logits of every position), one sequence at a time. Capture: `llama_tap.GraphTap` on `cb_eval`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hallulens_capture.errors import CaptureConfigError, ModelFilesError
from hallulens_capture.positions import token_positions
from hallulens_capture.record import storage_from_float32
from hallulens_capture.session import CapturedSample, CaptureSession
from hallulens_capture.spec import CaptureSpec
from hallulens_models.chat_template import ChatTemplate
from hallulens_models.harness import CaptureMixin, join_harness_cli

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _context_callback(callback) -> Iterator[None]:
    """Make the next llama.cpp context carry `cb_eval` (Llama() has no argument for it)."""
    from llama_cpp import llama_cpp as llama_lib

    original = llama_lib.llama_context_default_params

    def with_callback():
        params = original()
        params.cb_eval = callback
        params.cb_eval_user_data = None
        return params

    llama_lib.llama_context_default_params = with_callback
    try:
        yield
    finally:
        llama_lib.llama_context_default_params = original


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class LlamaCppLM(TemplateLM):
    """The harness LM over llama-cpp-python; `HalluLensGGUFLM` adds capture on top."""

    _tap = None  # a GraphTap when capturing

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
        **kwargs,
    ) -> None:
        super().__init__()
        kwargs.pop("device", None)  # the harness passes it; llama.cpp uses n_gpu_layers
        kwargs.pop("max_batch_size", None)
        from llama_cpp import Llama

        path = gguf_path(pretrained)
        self._name = pretrained
        build = _context_callback(self._tap.callback) if self._tap else contextlib.nullcontext()
        try:
            with build:
                self._llm = Llama(
                    model_path=path,
                    n_ctx=int(n_ctx),
                    n_batch=int(n_batch),
                    n_threads=None if n_threads is None else int(n_threads),
                    n_gpu_layers=int(n_gpu_layers),
                    seed=int(seed),
                    verbose=False,
                    **kwargs,
                )
        except ValueError as exc:
            raise ModelFilesError(f"pretrained={path}: llama.cpp cannot load it: {exc}") from None
        # free llama.cpp before interpreter shutdown tears its bindings down
        weakref.finalize(self, self._llm.close)
        for needed in ("_ctx", "_batch", "input_ids"):
            if not hasattr(self._llm, needed):
                raise CaptureConfigError(
                    "this llama-cpp-python lacks Llama." + needed + ": tested with 0.3.36"
                )
        self._n_vocab = self._llm.n_vocab()
        self._rng = np.random.default_rng(int(seed))
        self.max_gen_toks = int(max_gen_toks)
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
        return self._llm.n_ctx()

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
    def _decode(self, tokens: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Feed `tokens` at positions `start`...; logits of every token or of the last one."""
        llm = self._llm
        llm._ctx.kv_cache_seq_rm(-1, start, -1)
        rows = []
        for i in range(0, len(tokens), llm.n_batch):
            chunk = tokens[i : i + llm.n_batch]
            n_past = start + i
            llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=all_logits)
            llm._ctx.decode(llm._batch)
            llm.input_ids[n_past : n_past + len(chunk)] = chunk
            n_out = len(chunk) if all_logits else 1
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_out, self._n_vocab))
            rows.append(logits.copy() if all_logits or i + len(chunk) == len(tokens) else None)
        llm.n_tokens = start + len(tokens)
        if all_logits:
            return np.concatenate(rows)
        return rows[-1]

    def _next_token(self, logits: np.ndarray, gen_kwargs: dict) -> int:
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0) or temperature <= 0:
            return int(np.argmax(logits))
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

    def _capture_scope(self) -> str | None:
        """Token scope being captured in this generation (None: no capture)."""
        return None

    def _captured_rows(self, context: str, prompt: list[int], generated: list[int], rows) -> None:
        """Receives the captured rows of one generation (see HalluLensGGUFLM)."""

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [s for s in ([until] if isinstance(until, str) else until) if s]
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        prompt = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
        scope, tap = self._capture_scope(), self._tap
        keep_prompt = scope in ("prompt", "all")
        if tap is not None:
            tap.active = keep_prompt
        # the last layer of every prompt token exists only where logits are requested
        logits = self._decode(prompt, 0, all_logits=keep_prompt and self._wants_last_layer)
        prefill = tap.take(len(prompt)) if keep_prompt else None
        if tap is not None:
            tap.active = scope in ("generated", "all")
        generated: list[int] = []
        while True:
            token = self._next_token(logits[-1], kwargs)
            generated.append(token)
            if token in self._eog or any(s in self.tok_decode(generated) for s in until):
                break
            if len(generated) >= max_new or len(prompt) + len(generated) >= self.max_length:
                break
            logits = self._decode([token], len(prompt) + len(generated) - 1, all_logits=False)
        if scope is not None:
            tap.active = False
            n_decoded = max(len(generated) - 1, 0)  # the last token is never fed back
            decoded = tap.take(n_decoded if scope != "prompt" else 0)
            rows = decoded if prefill is None else np.concatenate([prefill, decoded], axis=1)
            self._captured_rows(context, prompt, generated, rows)
        text = self.tok_decode([t for t in generated if t not in self._eog])
        for stop in until:
            text = text.split(stop)[0]
        return text

    _wants_last_layer = False

    # --- the harness API ---------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="Running generate_until"):
            context, gen_kwargs = request.args
            text = self._generate(context, gen_kwargs)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for cache_key, context_enc, continuation_enc in tqdm(
            requests, disable=disable_tqdm, desc="Running loglikelihood"
        ):
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            n_cont = len(continuation_enc)
            logits = self._decode(tokens[:-1], 0, all_logits=True)[-n_cont:]
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


def gguf_path(pretrained: str) -> str:
    from hallulens_models.embedded import SMOLLM2, smollm2_gguf

    return str(smollm2_gguf()) if pretrained == SMOLLM2 else pretrained


def _gguf_shape(path: str) -> tuple[int, int]:
    """(decoder layers, hidden size) from the GGUF header, before llama.cpp loads the weights."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        return (
            int(fields[f"{arch}.block_count"].parts[-1][0]),
            int(fields[f"{arch}.embedding_length"].parts[-1][0]),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFilesError(f"pretrained={path}: not a readable GGUF model: {exc}") from None


@register_model("hallulens-gguf")
class HalluLensGGUFLM(CaptureMixin, LlamaCppLM):
    """`hallulens-gguf`: LlamaCppLM plus capture with `activations=` (DESIGN.md model_args)."""

    def __init__(
        self,
        pretrained: str = "smollm2",
        activations: str | None = None,
        capture_layers: object = None,
        capture_tokens: str | None = None,
        capture_dtype: str | None = None,
        map_size_gb: float | None = None,
        **kwargs,
    ) -> None:
        join_harness_cli()
        spec = CaptureSpec.from_model_args(
            activations, capture_layers, capture_tokens, capture_dtype, map_size_gb
        )
        if spec is not None:
            from hallulens_models.llama_tap import GraphTap

            n_layer, n_embd = _gguf_shape(gguf_path(pretrained))
            layer_ids = spec.layer_ids(n_layer)  # bad options fail before weights load
            self._tap = GraphTap(layer_ids, n_embd)
            self._wants_last_layer = n_layer in layer_ids
        super().__init__(pretrained=pretrained, **kwargs)
        if spec is not None:
            self._start_capture(CaptureSession(spec, layer_ids, pretrained, backend="gguf"))

    def _capture_scope(self) -> str | None:
        return self._capture.spec.tokens if self.capturing else None

    def _captured_rows(self, context: str, prompt: list[int], generated: list[int], rows) -> None:
        scope = self._capture.spec.tokens
        positions = token_positions(scope, len(prompt), len(generated))
        self._captured(
            CapturedSample(
                prompt=context,
                prompt_token_ids=prompt,
                generated_token_ids=generated,
                token_positions=positions,
                activations=storage_from_float32(rows, self._capture.spec.dtype),
            )
        )

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        if self._capture is not None:
            info.update(self._capture.info())
        return info
