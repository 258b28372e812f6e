"""A model's text config, read before its weights, so bad capture options fail in a second."""

from __future__ import annotations

import transformers

from hallulens_capture.errors import ModelFilesError


def text_config(pretrained: str | transformers.PreTrainedModel, kwargs: dict):
    """The decoder's config (`num_hidden_layers`, `hidden_size`) of a path, hub id or model."""
    if isinstance(pretrained, transformers.PreTrainedModel):
        return pretrained.config.get_text_config()
    try:
        config = transformers.AutoConfig.from_pretrained(
            pretrained,
            revision=kwargs.get("revision") or "main",
            trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
            subfolder=kwargs.get("subfolder") or "",
            gguf_file=kwargs.get("gguf_file"),
        )
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFilesError(
            f"pretrained={pretrained}: cannot read the model config: {reason}"
        ) from None
    return config.get_text_config()
