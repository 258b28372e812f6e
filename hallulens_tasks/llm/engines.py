"""In-process LLMs (judges, generators): the harness's HFLM, llama.cpp and vLLM's offline engine.

Each takes the prompts as single user turns through the model's own chat template, in chunks,
with the sampling parameters of the pass (`temperature`, `max_tokens`, optionally `top_p` and
`seed`; judges use temperature 0, question generators sample), handing replies to `done` chunk
by chunk so an interrupted pass keeps what it had. A loaded engine stays loaded for the rest
of the process (every task of a run shares it). Engines are imported only when one is chosen.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

from hallulens_tasks.llm.settings import LLMSettings
from hallulens_tasks.llm.spec import LLMError, backend_class

log = logging.getLogger(__name__)

Done = Callable[[int, str], None]
Choices = Sequence[tuple[str, ...] | None]  # allowed replies per prompt (constrained judging)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _user_turn(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _typed(value: str) -> object:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


class HFBackend:
    """The harness's own HFLM (batched generation); `hf:smollm2` is the embedded model.

    A sampling `seed` seeds torch before each chunk, so sampled replies depend on the chunk
    they are in (the other engines seed each request).
    """

    in_process = True
    constrained = False

    def __init__(self, settings: LLMSettings):
        import torch
        from lm_eval.models.huggingface import HFLM

        from hallulens_models.embedded import resolve_pretrained

        device = "cuda" if torch.cuda.is_available() else "cpu"
        args = {"batch_size": 8, "device": device, **settings.model_args}
        try:
            self._lm = HFLM(pretrained=resolve_pretrained(settings.spec.model), **args)
        except (OSError, ValueError) as exc:
            raise LLMError(
                f"{settings.role} {settings.spec}: cannot load the model: {exc}"
            ) from None

    def complete(
        self, prompts: Sequence[str], choices: Choices, done: Done, sampling: dict
    ) -> None:
        import torch
        from lm_eval.api.instance import Instance

        gen_kwargs: dict = {"until": [], "max_gen_toks": sampling["max_tokens"], "do_sample": False}
        if sampling["temperature"] > 0:
            gen_kwargs.update(
                do_sample=True,
                temperature=sampling["temperature"],
                top_p=sampling.get("top_p", 1.0),
            )
        for chunk in _chunks(len(prompts), 64):
            if sampling.get("seed") is not None:
                torch.manual_seed(sampling["seed"])
            requests = [
                Instance(
                    request_type="generate_until",
                    doc={},
                    arguments=(self._lm.apply_chat_template(_user_turn(prompts[i])), gen_kwargs),
                    idx=i,
                )
                for i in chunk
            ]
            texts = self._lm.generate_until(requests, disable_tqdm=True)
            for i, text in zip(chunk, texts, strict=True):
                done(i, text)


class GGUFBackend:
    """llama-cpp-python in process, with the GGUF's own chat template; `gguf:smollm2` is embedded.

    With HALLULENS_JUDGE_CONSTRAINED=1 a grammar restricts each reply to its item's allowed
    verdicts (constrained decoding), so even a small judge always answers in format.
    """

    in_process = True
    constrained = True

    def __init__(self, settings: LLMSettings):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise LLMError(
                f"{settings.role} {settings.spec} needs llama-cpp-python: "
                "pip install 'lm-eval-hallulens[gguf]'"
            ) from None
        from hallulens_models.embedded import resolve_gguf

        path = resolve_gguf(settings.spec.model)
        args = {"n_ctx": 8192, "verbose": False}
        args.update({k: _typed(v) for k, v in settings.model_args.items()})
        try:
            self._llm = Llama(model_path=path, **args)
        except (ValueError, OSError, RuntimeError) as exc:
            raise LLMError(f"{settings.role} {settings.spec}: cannot load {path}: {exc}") from None
        self._grammars: dict[tuple[str, ...], object] = {}

    def _grammar(self, choices: tuple[str, ...]):
        from llama_cpp import LlamaGrammar

        if choices not in self._grammars:
            rule = " | ".join(json.dumps(choice) for choice in choices)
            self._grammars[choices] = LlamaGrammar.from_string(f"root ::= {rule}", verbose=False)
        return self._grammars[choices]

    def complete(
        self, prompts: Sequence[str], choices: Choices, done: Done, sampling: dict
    ) -> None:
        for i, prompt in enumerate(prompts):
            reply = self._llm.create_chat_completion(
                messages=_user_turn(prompt),
                temperature=sampling["temperature"],
                top_p=sampling.get("top_p", 1.0),
                seed=sampling.get("seed"),
                max_tokens=sampling["max_tokens"],
                grammar=self._grammar(choices[i]) if choices[i] else None,
            )
            done(i, reply["choices"][0]["message"]["content"] or "")


class VLLMBackend:
    """vLLM's offline `LLM.chat`: continuous batching over the whole chunk.

    With HALLULENS_JUDGE_CONSTRAINED=1 each reply is restricted to its item's allowed verdicts
    through vLLM's structured outputs (`choice`).
    """

    in_process = True
    constrained = True

    def __init__(self, settings: LLMSettings):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise LLMError(
                f"{settings.role} {settings.spec} needs vLLM: pip install 'lm-eval-hallulens[vllm]'"
            ) from None
        from hallulens_models.embedded import resolve_pretrained
        from hallulens_models.vllm_defaults import cpu_memory_default

        args = {k: _typed(v) for k, v in settings.model_args.items()}
        args.update(cpu_memory_default(args))
        self._llm = LLM(model=resolve_pretrained(settings.spec.model), **args)
        self._params = SamplingParams

    def _sampling(self, choices: tuple[str, ...] | None, sampling: dict):
        params = {
            "temperature": sampling["temperature"],
            "top_p": sampling.get("top_p", 1.0),
            "seed": sampling.get("seed"),
            "max_tokens": sampling["max_tokens"],
        }
        if not choices:
            return self._params(**params)
        from vllm.sampling_params import StructuredOutputsParams

        return self._params(
            **params, structured_outputs=StructuredOutputsParams(choice=list(choices))
        )

    def complete(
        self, prompts: Sequence[str], choices: Choices, done: Done, sampling: dict
    ) -> None:
        for chunk in _chunks(len(prompts), 1024):
            outputs = self._llm.chat(
                [_user_turn(prompts[i]) for i in chunk],
                [self._sampling(choices[i], sampling) for i in chunk],
                use_tqdm=False,
            )
            for i, output in zip(chunk, outputs, strict=True):
                done(i, output.outputs[0].text)


_LOADED: dict[tuple, object] = {}


def backend_for(settings: LLMSettings):
    """The backend for `settings`; in-process engines are loaded once per process."""
    backend = backend_class(settings.spec.backend)
    if not backend.in_process:
        return backend(settings)
    key = (settings.spec, tuple(sorted(settings.model_args.items())))
    if key not in _LOADED:
        log.info("loading %s %s", settings.role, settings.spec)
        _LOADED[key] = backend(settings)
    return _LOADED[key]
