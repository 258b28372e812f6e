"""The LLM judge: settings, cache, backends and the batched pass (see core.py)."""
