"""MixedEntities names: upstream's recombination, made deterministic and bounded.

The fixtures (tests/fixtures/sources) are small enough that every possible name was listed by
hand below, so "exhaust the pool" checks the whole procedure, not just its shape.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hallulens_tasks.generation.errors import NotEnoughNamesError
from hallulens_tasks.generation.mixed_entities import (
    TEMPLATES,
    counts_by_type,
    generate_mixed_entities,
    medicine_names,
    taxonomy_names,
    types_for,
)
from hallulens_tasks.generation.sources import load_itis, load_medicines

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sources"

# every new name the fixture allows, worked out by hand from the fixture tree
ANIMALS = {
    "Corvilla borealis", "Falconetta borealis", "Falconetta minuta", "Falconetta velox",
    "Ardexa nigra", "Falconetta nigra", "Ardexa rapida", "Corvilla rapida",
    "Ardexa pallida", "Corvilla pallida", "Falconetta pallida",
    "Varanella viridis", "Varanella agilis",
    # Mustelina's species have subspecies: it lends its name, but its three-word leaves are
    # never models (they would give "Mustelina lenta fera")
    "Mustelina borealis", "Mustelina minuta", "Mustelina velox", "Mustelina nigra",
    "Mustelina rapida", "Mustelina pallida",
}  # fmt: skip
PLANTS = {
    "Quercella alba", "Liliora alba", "Quercella odorata", "Tulipina odorata", "Liliora odorata",
    "Rosmara alta", "Tulipina alta", "Liliora alta", "Rosmara regia", "Quercella regia",
    "Tulipina regia", "Rosmara naënsis", "Quercella naënsis", "Tulipina naënsis",
}  # fmt: skip
BACTERIA = {"Coccina subtilina", "Bacillora aurea", "Bacillora minor"}
# medicines: 10 x 8 two-word combinations minus 10 existing, 4 x 4 x 4 three-word minus 4
MEDICINE_POSSIBLE = 70 + 60


@pytest.fixture(scope="module")
def itis():
    return load_itis(FIXTURES / "itis")


@pytest.fixture(scope="module")
def medicines():
    return load_medicines(FIXTURES / "medicine_dataset.csv")


def _longnames() -> set[str]:
    text = (FIXTURES / "itis" / "longnames").read_bytes().decode("iso-8859-1")
    return {line.split("|", 1)[1] for line in text.splitlines()}


def _existing_medicines() -> set[str]:
    """Raw and cleaned names, read straight from the CSV."""
    import csv

    names = set()
    with open(FIXTURES / "medicine_dataset.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for column in ("name", *(f"substitute{i}" for i in range(5))):
                value = (row.get(column) or "").lower()
                if value:
                    names.add(value)
                    cleaned = re.sub(r"\(.*?\)", "", value)
                    names.add(" ".join(w for w in cleaned.split() if not re.search(r"\d", w)))
    return names


def _generate(itis, medicines, n=3, seed=0, **kwargs):
    return generate_mixed_entities(n, seed, medicines=medicines, itis=itis, **kwargs)


def test_rows_counts_templates_and_types(itis, medicines):
    rows = _generate(itis, medicines, n=3)
    assert counts_by_type(rows) == {"medicine": 3, "animal": 3, "plant": 3, "bacteria": 3}
    assert [r["type"] for r in rows] == ["medicine"] * 3 + ["animal"] * 3 + ["plant"] * 3 + [
        "bacteria"
    ] * 3
    for row in rows:
        assert set(row) == {"prompt", "name", "type"}
        assert row["prompt"] in {t.format(type=row["type"], name=row["name"]) for t in TEMPLATES}
    assert len(TEMPLATES) == 10 and len(set(TEMPLATES)) == 10
    assert all("{type}" in t and "{name}" in t for t in TEMPLATES)


def test_same_seed_same_rows_other_seed_other_rows(itis, medicines):
    first = _generate(itis, medicines, n=10, types=("medicine", "animal", "plant"))
    again = _generate(itis, medicines, n=10, types=("medicine", "animal", "plant"))
    other = _generate(itis, medicines, n=10, seed=1, types=("medicine", "animal", "plant"))
    assert first == again
    assert first != other


def test_a_type_alone_gives_the_same_rows_as_with_the_others(itis, medicines):
    everything = _generate(itis, medicines, n=3)
    for kind in ("medicine", "animal", "plant", "bacteria"):
        alone = _generate(itis, medicines, n=3, types=(kind,))
        assert alone == [r for r in everything if r["type"] == kind]


_SCRIPT = """
import json, sys
from pathlib import Path
from hallulens_tasks.generation.mixed_entities import generate_mixed_entities
from hallulens_tasks.generation.sources import load_itis, load_medicines
root = Path(sys.argv[1])
sources = dict(
    medicines=load_medicines(root / "medicine_dataset.csv"), itis=load_itis(root / "itis")
)
print(json.dumps([
    generate_mixed_entities(3, 5, **sources),
    generate_mixed_entities(12, 5, types=("medicine", "animal", "plant"), **sources),
]))
"""


def test_output_does_not_depend_on_pythonhashseed(itis, medicines):
    expected = [
        _generate(itis, medicines, n=3, seed=5),
        _generate(itis, medicines, n=12, seed=5, types=("medicine", "animal", "plant")),
    ]
    for hash_seed in ("0", "1", "2024"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(FIXTURES)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == expected, f"PYTHONHASHSEED={hash_seed}"


def test_taxonomy_names_are_new_distinct_and_exhaustive(itis):
    existing = _longnames()
    for kind, possible in (("animal", ANIMALS), ("plant", PLANTS), ("bacteria", BACTERIA)):
        names = taxonomy_names(itis, kind, len(possible), random.Random(11))
        assert len(names) == len(set(names)) == len(possible)
        assert set(names) == possible, kind
        assert not set(names) & existing


def test_row_order_of_the_dump_does_not_matter(itis, tmp_path):
    folder = tmp_path / "itis"
    folder.mkdir()
    lines = (FIXTURES / "itis" / "hierarchy").read_bytes().splitlines(keepends=True)
    (folder / "hierarchy").write_bytes(b"".join(reversed(lines)))
    names = (FIXTURES / "itis" / "longnames").read_bytes().splitlines(keepends=True)
    (folder / "longnames").write_bytes(b"".join(reversed(names)))
    shuffled = load_itis(folder)
    assert [c.tsn for c in shuffled.nodes[1111].children] != [
        c.tsn for c in itis.nodes[1111].children
    ]
    for kind in ("animal", "plant"):
        assert taxonomy_names(shuffled, kind, 8, random.Random(4)) == taxonomy_names(
            itis, kind, 8, random.Random(4)
        )


def test_medicine_names_are_new_distinct_and_recombined(medicines):
    names = medicine_names(medicines.names(), MEDICINE_POSSIBLE, random.Random(3))
    assert len(names) == len(set(names)) == MEDICINE_POSSIBLE
    assert not set(names) & _existing_medicines()
    firsts = {"zorvex", "dermalin", "brivonex", "oxelin", "ravolin", "calmora", "lumidol"}
    firsts |= {"kestrel", "ulmora", "fenrix"}
    forms = {"tablet", "cream", "syrup", "capsule", "suspension", "injection", "drops", "gel"}
    two = (firsts, forms)
    three = ({"neuvira", "tarvix", "ostira", "velnox"}, {"plus", "kid", "forte", "duo"})
    three += ({"capsule", "drops", "tablet", "syrup"},)
    for name in names:
        words = name.split()
        pools = {2: two, 3: three}[len(words)]
        assert all(word in pool for word, pool in zip(words, pools, strict=True)), name
    assert sum(len(n.split()) == 3 for n in names) == 60


def test_not_enough_names_stops_with_a_count(itis, medicines):
    with pytest.raises(NotEnoughNamesError, match=r"^bacteria: found only 3 of the 4 new names"):
        taxonomy_names(itis, "bacteria", 4, random.Random(0))
    with pytest.raises(NotEnoughNamesError, match=r"after 10,000 attempts.*at most 3 with --N"):
        _generate(itis, medicines, n=4, types=("bacteria",))
    with pytest.raises(NotEnoughNamesError, match=rf"found only {MEDICINE_POSSIBLE} of the"):
        medicine_names(medicines.names(), MEDICINE_POSSIBLE + 1, random.Random(0))
    with pytest.raises(NotEnoughNamesError, match=r"found only 2 of the 3 .* after 50 attempts"):
        medicine_names(["Alpha Tablet", "Beta Syrup"], 3, random.Random(0), max_attempts=50)


def test_types_for_upstream_experiment_names():
    assert types_for("nonsense_all") == ("medicine", "animal", "plant", "bacteria")
    assert types_for("nonsense_plant") == ("plant",)
    assert types_for("bacteria") == ("bacteria",)
    assert types_for(["animal", "medicine"]) == ("animal", "medicine")
    with pytest.raises(Exception, match="unknown MixedEntities selection fungi"):
        types_for("fungi")
