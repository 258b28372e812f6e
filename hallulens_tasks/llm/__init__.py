"""The one LLM client of the project: judges and `hallulens generate`'s generators both use it.

`spec` names an LLM (`<backend>:<model>`), `settings` says how to reach it, `cache` keeps every
reply on disk, `engines` (in process: hf, gguf, vllm) and `server` (any OpenAI-compatible
server) answer prompts, and `client` ties them together: render templates, look up the cache,
ask only what is missing, in one batch.
"""
