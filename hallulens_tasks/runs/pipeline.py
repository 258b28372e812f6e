"""`hallulens pipeline TASK`: the seed's one-command workflow, as the stock commands it stands for.

HalluLens ran each task as one script with `--do_generate_prompt --do_inference --do_eval`. Here
those flags (and the seed's other option names) select steps that run the documented commands
one after another, each printed before it runs, so a user can also run any of them alone:

1. `hallulens generate TASK ...` writes the prompt set under `--data_dir`;
2. `lm_eval --model hallulens-<backend> ... --predict_only --log_samples` answers it, recording
   activations into `--lmdb_path`;
3. `hallulens judge` judges the answers, `hallulens activations label` joins the verdicts to the
   store, `hallulens export-legacy` writes the seed's files under `--eval_results_path`.

LongWiki takes upstream's `--db_path` (the Wikipedia database) and `--k` (Recall@K), passed to the
judge as $HALLULENS_WIKI_DB and $HALLULENS_LONGWIKI_K, and answers with 1024 new tokens.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from hallulens_capture import hugepages
from hallulens_capture.errors import HalluLensError
from hallulens_capture.spec import ENV_STORE_PATH
from hallulens_tasks.judging.longwiki import ENV_K
from hallulens_tasks.judging.wikipedia import ENV_WIKI_DB
from hallulens_tasks.prompt_sets import ENV_DATA_DIR
from hallulens_tasks.task_table import FAMILIES, MIXED_EXPERIMENTS, SAMPLES_FILE

BACKENDS = {"hf": "hallulens-hf", "vllm": "hallulens-vllm", "gguf": "hallulens-gguf"}
BACKENDS["smallmodel"] = BACKENDS["hf"]  # the seed's name for its transformers path
MAX_TOKENS = {"longwiki": 1024}  # upstream's new tokens per answer; 256 for the other tasks


class PipelineError(HalluLensError):
    pass


def _run(command: list[str], env: dict[str, str] | None = None) -> None:
    """Run one step, printed first as a shell line with the settings it adds to the environment
    (so it can be rerun alone)."""
    settings = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    print("+ " + " ".join([*settings, shlex.join(command)]), file=sys.stderr, flush=True)
    done = subprocess.run(command, env={**os.environ, **(env or {})})
    if done.returncode:
        raise PipelineError(f"step failed (exit {done.returncode}): {shlex.join(command)}")


def _hallulens(*args: str) -> list[str]:
    return [sys.executable, "-m", "hallulens_tasks.cli", *args]


def latest_samples(directory: Path) -> list[Path]:
    """The newest `samples_<task>_<date>.jsonl` of each task under `directory` (earlier runs of
    the same task stay on disk but are not judged again)."""
    newest: dict[str, Path] = {}
    for path in directory.rglob("samples_*.jsonl"):
        match = SAMPLES_FILE.match(path.name)
        if match and "judged" not in path.parts:
            task = match["task"]
            if task not in newest or path.stat().st_mtime > newest[task].stat().st_mtime:
                newest[task] = path
    return [newest[task] for task in sorted(newest)]


def _harness_task(args: argparse.Namespace) -> str:
    """The seed's task and `--exp` as a harness task: the family's group or one subtask."""
    if args.task != "nonsense_mixed_entities":
        return args.task
    types = MIXED_EXPERIMENTS.get(args.exp)
    if types is None:
        raise PipelineError(f"--exp {args.exp}: expected one of {', '.join(MIXED_EXPERIMENTS)}")
    return args.task if len(types) > 1 else f"{args.task}_{types[0]}"


def _judge_env(args: argparse.Namespace) -> dict[str, str]:
    """LongWiki's judge settings from upstream's flags (the task checks them when it loads)."""
    env = {ENV_WIKI_DB: args.db_path} if args.db_path else {}
    if args.k is not None:
        env[ENV_K] = str(args.k)
    return env


def _generate(args: argparse.Namespace, data_dir: Path) -> None:
    command = _hallulens(
        "generate", args.task, "--N", str(args.N), "--seed", str(args.seed), "--out", str(data_dir)
    )
    if args.task == "nonsense_mixed_entities":
        command += ["--exp", args.exp]
    elif args.q_generator:
        command += ["--generator", args.q_generator]
    if args.wiki_src and args.wiki_src != "goodwiki":  # `goodwiki`: the seed's default source
        command += ["--source", f"goodwiki={args.wiki_src}"]
    for source in args.source:
        command += ["--source", source]
    _run(command)


def _infer(args: argparse.Namespace, data_dir: Path, results: Path) -> None:
    model_args = f"pretrained={args.model},activations={args.lmdb_path}"
    if args.model_args:
        model_args += f",{args.model_args}"
    command = [sys.executable, "-m", "lm_eval", "--model", BACKENDS[args.inference_method]]
    command += ["--model_args", model_args, "--tasks", _harness_task(args)]
    command += ["--apply_chat_template", "--batch_size", str(args.inf_batch_size)]
    max_tokens = args.max_inference_tokens or MAX_TOKENS.get(args.task, 256)
    command += ["--gen_kwargs", f"max_gen_toks={max_tokens}"]
    command += ["--output_path", str(results), "--log_samples", "--predict_only"]
    command += ["--seed", str(args.seed)]
    # malloc's huge pages for the store's large records (`hallulens_capture.hugepages`)
    tunables = {hugepages.ENV: hugepages.with_huge_pages(os.environ.get(hugepages.ENV))}
    _run(command, {ENV_DATA_DIR: str(data_dir), **_judge_env(args), **tunables})


def _evaluate(args: argparse.Namespace, results: Path, model_name: str) -> bool:
    """Judge, label, write the seed's files; whether the store was labelled."""
    samples = latest_samples(results)
    if not samples:
        raise PipelineError(f"no samples_*.jsonl under {results}: run with --do_inference first")
    judged = results / "judged"
    _run(_hallulens("judge", *map(str, samples), "--output_path", str(judged)), _judge_env(args))
    judged_files = [judged / path.name for path in samples]
    labelled = Path(args.lmdb_path, "data.mdb").is_file()
    if labelled:
        _run(
            _hallulens(
                "activations",
                "label",
                "--samples",
                *map(str, judged_files),
                "--store",
                args.lmdb_path,
            )
        )
    _run(
        _hallulens(
            "export-legacy",
            "--samples",
            *map(str, judged_files),
            "--out",
            args.eval_results_path,
            "--model",
            model_name,
        )
    )
    return labelled


def _own_model_args(text: str | None) -> None:
    """`--model_args` may not set what the pipeline's own flags set."""
    given = {part.partition("=")[0].strip() for part in (text or "").split(",") if "=" in part}
    for key, flag in (("activations", "--lmdb_path"), ("pretrained", "--model")):
        if key in given:
            raise PipelineError(
                f"--model_args {key}=... contradicts the pipeline's {flag}: give it with {flag}"
            )


def cmd_pipeline(args: argparse.Namespace) -> int:
    if not (args.do_generate_prompt or args.do_inference or args.do_eval):
        raise PipelineError(
            "nothing to do: give --do_generate_prompt, --do_inference and/or --do_eval"
        )
    if not FAMILIES[args.task].in_harness and (args.do_inference or args.do_eval):
        raise PipelineError(
            f"{args.task}: only --do_generate_prompt is available (its lm_eval task and "
            "claim-level judge are not in this release)"
        )
    if args.N < 1:
        raise PipelineError(f"--N must be at least 1 (got {args.N})")
    if args.do_eval and args.db_path and not Path(args.db_path).expanduser().is_file():
        raise PipelineError(
            f"--db_path {args.db_path}: no such file (LongWiki's Wikipedia database, "
            "FActScore's enwiki-20230401.db)"
        )
    _own_model_args(args.model_args)
    data_dir = Path(args.data_dir or os.environ.get(ENV_DATA_DIR) or "data").expanduser()
    results = Path(args.results_path or Path(args.eval_results_path) / "lm_eval")
    model_name = Path(args.model).name if os.sep in args.model else args.model
    if args.do_generate_prompt:
        _generate(args, data_dir)
    if args.do_inference:
        if not (data_dir / args.task / "prompts.jsonl").exists():
            raise PipelineError(
                f"no prompt set {data_dir / args.task / 'prompts.jsonl'}: "
                "run with --do_generate_prompt first or point --data_dir at one"
            )
        _infer(args, data_dir, results)
    stored = Path(args.lmdb_path, "data.mdb").is_file()
    if args.do_eval and not _evaluate(args, results, model_name):
        print(f"no activation store at {args.lmdb_path}: nothing was labelled", file=sys.stderr)
    print(
        f"done: seed files under {args.eval_results_path}"
        + (f", activations in {args.lmdb_path}" if stored else "")
    )
    return 0


def register(subparsers) -> None:
    """Add `pipeline` to the `hallulens` parser (the seed's flag names, plus ours)."""
    p = subparsers.add_parser(
        "pipeline",
        help="generate → lm_eval inference (with capture) → judge → seed files, in one command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task", choices=tuple(FAMILIES))
    p.add_argument("--do_generate_prompt", action="store_true", help="step 1: build the prompt set")
    p.add_argument("--do_inference", action="store_true", help="step 2: answer it with lm_eval")
    p.add_argument("--do_eval", action="store_true", help="step 3: judge, label, seed files")
    p.add_argument("--N", type=int, default=100, help="as `hallulens generate --N`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model",
        "--tested_model",
        dest="model",
        default="smollm2",
        help="tested model: pretrained= of the backend (default: smollm2)",
    )
    p.add_argument(
        "--inference_method",
        choices=sorted(BACKENDS),
        default="hf",
        help="backend: hf (hallulens-hf), vllm (hallulens-vllm), gguf (hallulens-gguf)",
    )
    p.add_argument("--model_args", help="more model_args for the backend, k=v,...")
    p.add_argument("--q_generator", help="question/name generator spec, e.g. gguf:/models/x.gguf")
    p.add_argument(
        "--wiki_src", help="GoodWiki: a local .parquet/.jsonl, or `goodwiki` to download"
    )
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="local copy of another source (wikirank, itis, medicines); repeatable",
    )
    p.add_argument(
        "--exp",
        default="nonsense_all",
        help="mixed entities: nonsense_all or nonsense_<medicine|animal|plant|bacteria>",
    )
    p.add_argument("--data_dir", help=f"prompt-set root (default: ${ENV_DATA_DIR}, else ./data)")
    p.add_argument("--eval_results_path", default="output", help="root of the seed's files")
    p.add_argument(
        "--results_path", help="lm_eval --output_path (default: EVAL_RESULTS_PATH/lm_eval)"
    )
    p.add_argument(
        "--lmdb_path",
        default=os.environ.get(ENV_STORE_PATH, "lmdb_data/activations.lmdb"),
        help=f"activation store (default: ${ENV_STORE_PATH}, else the seed's path)",
    )
    p.add_argument(
        "--max_inference_tokens",
        "--max_tokens",
        dest="max_inference_tokens",
        type=int,
        help="new tokens per answer (default: upstream's, 1024 for longwiki, else 256)",
    )
    p.add_argument("--db_path", help=f"longwiki: the Wikipedia database (as ${ENV_WIKI_DB})")
    p.add_argument("--k", type=int, help=f"longwiki: K of Recall@K and F1@K (as ${ENV_K}; 32)")
    p.add_argument("--inf_batch_size", default="8", help="lm_eval --batch_size (or auto)")
    p.set_defaults(func=cmd_pipeline)
