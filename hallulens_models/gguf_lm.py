"""`hallulens-gguf`: the llama.cpp harness LM (`llama_cpp_lm`) plus activation capture.

Capture is an observer of the plain model: `llama_tap.TapObserver` reads the chosen layers
through llama.cpp's `cb_eval` and the token statistics from each step's logits, and hands each
generation to the shared record writer as soon as it is finished.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model

from hallulens_capture.errors import ModelFilesError
from hallulens_capture.positions import token_positions
from hallulens_capture.record import storage_from_float32
from hallulens_capture.session import CapturedSample
from hallulens_models.capture_mixin import CaptureMixin
from hallulens_models.embedded import resolve_gguf
from hallulens_models.llama_cpp_lm import LlamaCppLM


def _gguf_shape(path: str) -> tuple[int, int, int]:
    """(decoder layers, hidden size, vocabulary) from the GGUF header, before llama.cpp loads
    the weights."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        return (
            int(fields[f"{arch}.block_count"].parts[-1][0]),
            int(fields[f"{arch}.embedding_length"].parts[-1][0]),
            len(fields["tokenizer.ggml.tokens"].data),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFilesError(f"pretrained={path}: not a readable GGUF model: {exc}") from None


@register_model("hallulens-gguf")
class HalluLensGGUFLM(CaptureMixin, LlamaCppLM):
    """`hallulens-gguf`: LlamaCppLM plus capture with `activations=` (README: model_args)."""

    def __init__(self, pretrained: str = "smollm2", **kwargs) -> None:
        spec = self._capture_spec(kwargs)
        if spec is None:
            super().__init__(pretrained=pretrained, **kwargs)
            return
        from hallulens_models.llama_tap import TapObserver

        n_layer, n_embd, n_vocab = _gguf_shape(resolve_gguf(pretrained))
        layer_ids = spec.layer_ids(n_layer)  # bad options fail before weights load
        spec.check_vocab(n_vocab)
        observer = TapObserver(layer_ids, n_layer, n_embd, spec.tokens, spec.topk, self._tapped)
        super().__init__(pretrained=pretrained, observer=observer, **kwargs)
        self._start_capture(spec, layer_ids, pretrained, backend="gguf")

    def _tapped(
        self, context: str, prompt: list[int], generated: list[int], text: str, rows, stats
    ) -> None:
        """One finished generation ([layers, tokens, hidden] float32 rows) to the writer."""
        spec = self._capture.spec
        sample = CapturedSample(
            prompt_token_ids=prompt,
            generated_token_ids=generated,
            token_positions=token_positions(spec.tokens, len(prompt), len(generated)),
            activations=storage_from_float32(rows, spec.dtype),
            token_stats=stats,
        )
        self._finished(context, text, sample)
