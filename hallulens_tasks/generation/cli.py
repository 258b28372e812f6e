"""`hallulens generate TASK`: build a frozen prompt set (HalluLens step 0) with its manifest.

One set serves every tested model (upstream generated a new set per tested model). Same
sources, arguments and generator replies give a byte-identical prompts.jsonl; generator
replies are cached, so a re-run with the same cache asks nothing, and a run that was
interrupted is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hallulens_capture.options import checked_number
from hallulens_tasks.generation.errors import GenerationError
from hallulens_tasks.generation.llm import ENV_CACHE, Generator, generator_cache
from hallulens_tasks.generation.sources import load_source, parse_source_args, provenance_manifest
from hallulens_tasks.generation.writer import write_prompt_set
from hallulens_tasks.llm.settings import parse_model_args
from hallulens_tasks.prompt_sets import ENV_DATA_DIR
from hallulens_tasks.task_table import DOMAINS, FAMILIES

log = logging.getLogger(__name__)


def _key_values(values: list[str], option: str, keys: tuple[str, ...]) -> dict[str, int]:
    parsed: dict[str, int] = {}
    for value in values:
        key, sep, number = value.partition("=")
        if not sep or key.strip() not in keys or not number.strip().isdigit():
            raise GenerationError(
                f"{option} {value!r}: expected DOMAIN=COUNT with DOMAIN one of {', '.join(keys)}"
            )
        parsed[key.strip()] = int(number)
    return parsed


def _generator(args: argparse.Namespace, spec: str) -> Generator:
    concurrency = checked_number(
        "--concurrency", args.concurrency, minimum=1, integer=True, error=GenerationError
    )
    return Generator(
        spec,
        cache_path=generator_cache(args.cache),
        base_url=args.base_url,
        concurrency=int(concurrency),
        model_args=parse_model_args(args.model_args, "--model-args"),
    )


def _titles_file(path: str) -> tuple[list[str], dict]:
    from hallulens_tasks.generation.download import sha256_file

    file = Path(path).expanduser()
    try:
        titles = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerationError(f"--exclude-titles {file}: cannot read: {exc}") from None
    record = {"source": "exclude_titles", "path": str(file), "sha256": sha256_file(file)}
    return [t for t in titles if t], {**record, "origin": "local"}


def _wiki(args: argparse.Namespace, local: dict) -> tuple[list[dict], dict, list[Generator]]:
    from hallulens_tasks.generation.wiki import WIKI_TASKS, build_wiki_set

    generator = _generator(args, args.generator)  # a typo fails before the sources load
    try:
        goodwiki = load_source("goodwiki", local, args.source_cache)
        titles = [article["title"] for article in goodwiki.articles]
        wikirank = load_source("wikirank", local, args.source_cache, only=titles)
        sources = provenance_manifest(goodwiki, wikirank)
        exclude: list[str] = []
        if args.exclude_titles:
            exclude, record = _titles_file(args.exclude_titles)
            sources.append(record)
        built = build_wiki_set(
            WIKI_TASKS[args.task],
            goodwiki,
            wikirank,
            args.N,
            args.seed,
            generator,
            overgenerate=args.overgenerate,
            max_candidates=args.max_candidates,
            exclude=exclude,
        )
    finally:
        generator.close()
    manifest = {
        "generator": generator.name,
        "sources": sources,
        "bins": built.bins.manifest(),
        "generation": built.report,
        "templates": dict(sorted(generator.stats.templates.items())),
    }
    return built.rows, manifest, [generator]


def _mixed(args: argparse.Namespace, local: dict) -> tuple[list[dict], dict, list[Generator]]:
    from hallulens_tasks.generation.mixed_entities import (
        counts_by_type,
        generate_mixed_entities,
        types_for,
    )

    types = types_for(args.exp)
    medicines = load_source("medicines", local, args.source_cache) if "medicine" in types else None
    taxonomy = any(kind != "medicine" for kind in types)
    itis = load_source("itis", local, args.source_cache) if taxonomy else None
    rows = generate_mixed_entities(args.N, args.seed, types=types, medicines=medicines, itis=itis)
    manifest = {
        "generator": None,
        "sources": provenance_manifest(*(s for s in (medicines, itis) if s is not None)),
        "generation": {"exp": args.exp, "types": list(types), "counts": counts_by_type(rows)},
    }
    return rows, manifest, []


def _generated(args: argparse.Namespace, local: dict) -> tuple[list[dict], dict, list[Generator]]:
    from hallulens_tasks.generation.generated_entities import (
        build_generated_entities,
        load_existence_check,
        make_plans,
    )

    generators = [_generator(args, spec) for spec in args.generator]
    try:
        domains = [d.strip() for d in args.domains.split(",") if d.strip()]
        counts = {d: args.N for d in DOMAINS} | _key_values(args.domain_n, "--domain-n", DOMAINS)
        plans = make_plans(
            domains, counts, _key_values(args.name_num, "--name-num", DOMAINS), args.seed
        )
        check = load_existence_check(args.existence_check) if args.existence_check else None
        built = build_generated_entities(generators, plans, args.seed, existence_check=check)
    finally:
        for generator in generators:
            generator.close()
    templates: dict[str, str] = {}
    for generator in generators:
        templates.update(generator.stats.templates)
    built.report["existence_check"] = args.existence_check
    manifest = {
        "generator": [g.name for g in generators],
        "sources": [],
        "plans": {
            plan.domain.name: {
                "N": plan.n,
                "names_per_prompt": plan.name_num,
                "types": plan.types,
                "places": plan.places,
            }
            for plan in plans
        },
        "generation": built.report,
        "templates": dict(sorted(templates.items())),
    }
    return built.rows, manifest, generators


BUILDERS = {
    "precise_wikiqa": _wiki,
    "longwiki": _wiki,
    "nonsense_mixed_entities": _mixed,
    "nonsense_generated_entities": _generated,
}


def cmd_generate(args: argparse.Namespace) -> int:
    out = args.out or os.environ.get(ENV_DATA_DIR)
    if not out:
        raise GenerationError(f"--out DIR is required (or set {ENV_DATA_DIR})")
    if args.N < 1:
        raise GenerationError(f"--N must be at least 1 (got {args.N})")
    rows, manifest, generators = BUILDERS[args.task](args, parse_source_args(args.source))
    family = FAMILIES[args.task]
    manifest = {"N": args.N, "N_means": family.n_means, "seed": args.seed, **manifest}
    written = write_prompt_set(out, args.task, rows, manifest)
    for generator in generators:
        stats = generator.stats
        print(
            f"generator {generator.name}: {stats.items} calls, {stats.cache_hits} from the "
            f"cache, {stats.requests} asked",
            file=sys.stderr,
        )
    print(f"{written.prompts}: {written.rows} prompts, sha256 {written.sha256}")
    print(f"{written.manifest}")
    return 0


def register(subparsers) -> None:
    """Add `generate` and its task subcommands to the `hallulens` parser."""
    parser = subparsers.add_parser(
        "generate",
        help="build a frozen HalluLens prompt set (step 0)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    common.add_argument("--out", help=f"output root: writes OUT/TASK/ (default: ${ENV_DATA_DIR})")
    common.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a local copy of a source (goodwiki, wikirank, itis, medicines); repeatable. "
        "Otherwise sources are downloaded once into the source cache",
    )
    common.add_argument("--source-cache", help="where downloaded sources are kept")

    llm = argparse.ArgumentParser(add_help=False)
    llm.add_argument(
        "--cache",
        help=f"generator reply cache, or 'off' (default: ${ENV_CACHE}, else "
        "generate-cache.sqlite in the cache directory)",
    )
    llm.add_argument(
        "--base-url",
        help="OpenAI-compatible server of openai: generators (default: $OPENAI_BASE_URL, "
        "else http://127.0.0.1:8000/v1)",
    )
    llm.add_argument("--concurrency", type=int, default=16, help="requests in flight (openai:)")
    llm.add_argument("--model-args", help="engine options k=v,... (gguf:, hf:, vllm:)")

    wiki = argparse.ArgumentParser(add_help=False)
    wiki.add_argument(
        "--generator",
        required=True,
        metavar="SPEC",
        help="question generator: openai:MODEL, vllm:MODEL, hf:MODEL, gguf:PATH (or a .gguf "
        "path); upstream used Llama-3.1-70B-Instruct",
    )
    wiki.add_argument(
        "--overgenerate",
        type=float,
        default=0.2,
        help="extra candidates per wave, as a fraction of what a bin lacks (default 0.2)",
    )
    wiki.add_argument(
        "--max-candidates",
        type=int,
        help="articles tried per bin at most (default: 3 x the bin's quota + upstream's buffer)",
    )

    for name, help_text in (
        ("precise_wikiqa", "short-answer questions from GoodWiki sections"),
        ("longwiki", "essay questions from GoodWiki sections (5 most popular bins)"),
    ):
        p = tasks.add_parser(name, parents=[common, llm, wiki], help=help_text)
        p.add_argument(
            "--N", type=int, default=FAMILIES[name].default_n, help=FAMILIES[name].n_means
        )
        if name == "longwiki":
            p.add_argument(
                "--exclude-titles",
                metavar="FILE",
                help="titles never used, one per line (upstream: GoodWiki titles missing from "
                "the FActScore Wikipedia DB)",
            )
        p.set_defaults(func=cmd_generate, exclude_titles=None)

    p = tasks.add_parser(
        "nonsense_mixed_entities", parents=[common], help="recombined medicine and species names"
    )
    p.add_argument(
        "--N",
        type=int,
        default=FAMILIES["nonsense_mixed_entities"].default_n,
        help=FAMILIES["nonsense_mixed_entities"].n_means,
    )
    p.add_argument(
        "--exp",
        default="nonsense_all",
        help="nonsense_all | nonsense_medicine | nonsense_animal | nonsense_plant | "
        "nonsense_bacteria, or one type",
    )
    p.set_defaults(func=cmd_generate)

    p = tasks.add_parser(
        "nonsense_generated_entities",
        parents=[common, llm],
        help="made-up business, event and product names (LLM round robin)",
    )
    p.add_argument(
        "--generator",
        action="append",
        required=True,
        metavar="SPEC",
        help="name generator; give it 1 to 3 times for the round robin (upstream: "
        "Llama-3.1-405B-Instruct, Mistral-Nemo-Instruct-2407, gpt-4o)",
    )
    p.add_argument(
        "--N",
        type=int,
        default=FAMILIES["nonsense_generated_entities"].default_n,
        help=FAMILIES["nonsense_generated_entities"].n_means,
    )
    p.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset")
    p.add_argument(
        "--domain-n", action="append", default=[], metavar="DOMAIN=N", help="N for one domain"
    )
    p.add_argument(
        "--name-num",
        action="append",
        default=[],
        metavar="DOMAIN=K",
        help="names asked per prompt (default business=3, event=3, product=2)",
    )
    p.add_argument(
        "--existence-check",
        metavar="MODULE:FUNCTION",
        help="drop names this function says exist (off by default; upstream: Brave web search)",
    )
    p.set_defaults(func=cmd_generate)
