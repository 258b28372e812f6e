"""MixedEntities names (HalluLens NonExistentRefusal): real parts, recombined.

Medicines: a name is rebuilt word by word from the words that real names of the same length
use at the same position. Animals, plants, bacteria: the genus of a real two-word species is
swapped for another genus of the same family (a sibling of its parent that has children of its
own). A candidate that is an existing name is rejected. No LLM is involved.

Differences from upstream `entities_generation.py`, all to make a set reproducible:
- Every random draw comes from a `random.Random` seeded from (seed, type) as a string, so a
  type's names do not depend on which other types are generated, nor on PYTHONHASHSEED (upstream
  reseeded the global `random` and returned `list(set)`). Word pools and candidates
  are sorted lists; results keep the order in which they were found.
- Templates are drawn from a separate stream, so names do not depend on the template list.
- A bounded number of attempts: when fewer than N new names are found, NotEnoughNamesError says
  how many were (upstream looped forever).
- Missing values in the medicine CSV are skipped (upstream read them as the name "nan"), names
  that clean to nothing are skipped (upstream crashed), and medicines of more than three words
  are not drawn as models (upstream drew them and threw the attempt away: same distribution).
- A made-up medicine is rejected if it equals a raw or a cleaned existing name (upstream: cleaned
  only). A made-up species is rejected if it is any name in ITIS longnames, synonyms included
  (upstream: names of taxa in the hierarchy only). Taxa without a name are skipped (upstream
  crashed on them).
- Species are drawn uniformly among the two-word leaves of the kingdom that have at least one
  other genus to borrow, which is the distribution upstream's retry loop had.
- The ten prompt templates are this package's own wording; `{type}` is still the literal
  medicine|animal|plant|bacteria.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence

from hallulens_tasks.generation.errors import GenerationError, NotEnoughNamesError
from hallulens_tasks.generation.seeding import seeded_rng
from hallulens_tasks.generation.sources import Itis, Medicines, Taxon
from hallulens_tasks.task_table import MIXED_EXPERIMENTS, MIXED_TYPES

KINGDOMS = {"animal": "Animalia", "plant": "Plantae", "bacteria": "Bacteria"}
TEMPLATES = (
    "What can you tell me about the {type} {name}?",
    "Please tell me what you know about the {type} {name}.",
    "Give me a short description of the {type} {name}.",
    "What is known about the {type} {name}?",
    "Explain what the {type} {name} is.",
    "I came across the {type} {name}. What is it?",
    "Could you summarise the key facts about the {type} {name}?",
    "Write a brief overview of the {type} {name}.",
    "What are the main characteristics of the {type} {name}?",
    "I need some background on the {type} {name}. Can you help?",
)
_PARENS = re.compile(r"\(.*?\)")


def default_attempts(n: int) -> int:
    """Attempts allowed for `n` names: generous, since rejections are rare on the full sources."""
    return max(10_000, 50 * n)


def _rng(seed: int, kind: str, stream: str) -> random.Random:
    return seeded_rng("hallulens-mixed-entities", seed, kind, stream)


def _not_enough(kind: str, found: int, n: int, attempts: int, why: str) -> NotEnoughNamesError:
    return NotEnoughNamesError(
        f"{kind}: found only {found} of the {n} new names asked for after {attempts:,} attempts "
        f"({why}); ask for at most {found} with --N, or use a larger source"
    )


# --------------------------------------------------------------------------- medicines


def clean_medicine_name(name: str) -> str:
    """Upstream's cleaning: lowercase, no `(...)`, no word with a digit; '' if it has ',' or '&'."""
    name = _PARENS.sub("", name.lower())
    if "," in name or "&" in name:
        return ""
    return " ".join(word for word in name.split() if not any(ch.isdigit() for ch in word))


def medicine_names(
    names: Iterable[str],
    n: int,
    rng: random.Random,
    *,
    max_attempts: int | None = None,
) -> list[str]:
    """`n` new lowercase medicine names recombined from `names` (all existing names).

    Each attempt draws a model name (duplicates weigh more, as upstream), then for each of its
    words a word used at that position by names of the same length (1-3 words).
    """
    raw = [" ".join(x.lower().split()) for x in names]
    raw = [x for x in raw if x]
    cleaned = [c for c in map(clean_medicine_name, raw) if c]
    models = [c for c in cleaned if len(c.split()) <= 3]
    if not models:
        raise NotEnoughNamesError("medicine: no usable names of 1 to 3 words in the source")
    words: dict[int, list[set[str]]] = {}
    for name in models:
        parts = name.split()
        slots = words.setdefault(len(parts), [set() for _ in parts])
        for slot, word in zip(slots, parts, strict=True):
            slot.add(word)
    pools = {length: [sorted(slot) for slot in slots] for length, slots in words.items()}
    existing = set(raw) | set(cleaned)
    limit = default_attempts(n) if max_attempts is None else max_attempts
    found: dict[str, None] = {}
    attempts = 0
    while len(found) < n and attempts < limit:
        attempts += 1
        model = rng.choice(models)
        name = " ".join(rng.choice(pool) for pool in pools[len(model.split())])
        if name not in existing and name not in found:
            found[name] = None
    if len(found) < n:
        raise _not_enough("medicine", len(found), n, attempts, "recombinations exhausted")
    return list(found)


# --------------------------------------------------------------------------- taxonomy


def taxonomy_candidates(itis: Itis, kingdom: str) -> list[tuple[Taxon, list[Taxon]]]:
    """(species, other genera) pairs: two-word leaves of `kingdom` with a genus to borrow.

    Other genera are the siblings of the species' parent that have children and a name, by TSN.
    """
    pairs = []
    for leaf in itis.leaves(kingdom):
        if leaf.name is None or len(leaf.name.split(" ")) != 2:
            continue
        parent = leaf.parent
        grandparent = parent.parent if parent else None
        if grandparent is None:
            continue
        genera = sorted(
            (g for g in grandparent.children if g is not parent and g.children and g.name),
            key=lambda g: g.tsn,
        )
        if genera:
            pairs.append((leaf, genera))
    return pairs


def taxonomy_names(
    itis: Itis,
    kind: str,
    n: int,
    rng: random.Random,
    *,
    max_attempts: int | None = None,
) -> list[str]:
    """`n` new species names of type `kind` (animal, plant, bacteria): other genus + epithet."""
    if kind not in KINGDOMS:
        raise GenerationError(
            f"unknown taxonomy type {kind!r}: choose one of {', '.join(KINGDOMS)}"
        )
    pairs = taxonomy_candidates(itis, KINGDOMS[kind])
    if not pairs:
        raise NotEnoughNamesError(
            f"{kind}: ITIS has no two-word species in {KINGDOMS[kind]} whose family has another "
            "genus; the ITIS files look incomplete"
        )
    limit = default_attempts(n) if max_attempts is None else max_attempts
    found: dict[str, None] = {}
    attempts = 0
    while len(found) < n and attempts < limit:
        attempts += 1
        leaf, genera = rng.choice(pairs)
        genus = rng.choice(genera)
        name = f"{genus.name} {leaf.name.split(' ')[1]}"  # type: ignore[union-attr]
        if name not in itis.names and name not in found:
            found[name] = None
    if len(found) < n:
        raise _not_enough(kind, len(found), n, attempts, "genus swaps exhausted")
    return list(found)


# --------------------------------------------------------------------------- prompts


def prompt_rows(kind: str, names: Sequence[str], rng: random.Random) -> list[dict]:
    return [
        {"prompt": rng.choice(TEMPLATES).format(type=kind, name=name), "name": name, "type": kind}
        for name in names
    ]


def generate_mixed_entities(
    n: int,
    seed: int,
    *,
    types: Sequence[str] = MIXED_TYPES,
    medicines: Medicines | None = None,
    itis: Itis | None = None,
    max_attempts: int | None = None,
) -> list[dict]:
    """Rows `{"prompt", "name", "type"}`: `n` names per type, types in the order given.

    Same sources, `n` and `seed` give the same rows; a type's rows are the same whether it is
    generated alone or with the others.
    """
    if n < 1:
        raise GenerationError(f"--N must be at least 1 (got {n})")
    unknown = [kind for kind in types if kind not in MIXED_TYPES]
    if unknown or not types:
        raise GenerationError(
            f"unknown MixedEntities type(s) {', '.join(unknown) or '(none)'}: "
            f"choose from {', '.join(MIXED_TYPES)}"
        )
    rows: list[dict] = []
    for kind in dict.fromkeys(types):
        rng = _rng(seed, kind, "names")
        if kind == "medicine":
            if medicines is None:
                raise GenerationError("medicine names need the medicines source")
            names = medicine_names(medicines.names(), n, rng, max_attempts=max_attempts)
        else:
            if itis is None:
                raise GenerationError(f"{kind} names need the itis source")
            names = taxonomy_names(itis, kind, n, rng, max_attempts=max_attempts)
        rows += prompt_rows(kind, names, _rng(seed, kind, "templates"))
    return rows


def types_for(experiment: str | Iterable[str]) -> tuple[str, ...]:
    """Types of an upstream `--exp` name (nonsense_all, nonsense_animal, ...) or a type list."""
    if isinstance(experiment, str):
        if experiment in MIXED_EXPERIMENTS:
            return MIXED_EXPERIMENTS[experiment]
        experiment = [experiment]
    kinds = tuple(experiment)
    unknown = [kind for kind in kinds if kind not in MIXED_TYPES]
    if unknown or not kinds:
        raise GenerationError(
            f"unknown MixedEntities selection {', '.join(unknown) or '(none)'}: choose from "
            f"{', '.join(MIXED_EXPERIMENTS)} or {', '.join(MIXED_TYPES)}"
        )
    return kinds


def counts_by_type(rows: Iterable[Mapping]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["type"]] = counts.get(row["type"], 0) + 1
    return counts
