"""Source data of HalluLens step 0: where each source comes from and how its files are read.

Each source is read from its upstream format: GoodWiki (HF `euirim/goodwiki`),
WikiRank 2024 (titles + harmonic-centrality scores), the ITIS MySQL dump and Kaggle's 250k
medicines CSV. Any source can be a local file or directory (`--source NAME=PATH`); otherwise it
is downloaded once into the source cache. Every loaded source carries the sha256 of the files
it was read from, so a manifest pins the data a prompt set was built from (ITIS is republished
monthly; upstream recorded nothing). Known sha256 values are None: no pinned release exists.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from pathlib import Path
from typing import TextIO

from hallulens_tasks.generation.download import download, sha256_file, source_cache_dir
from hallulens_tasks.generation.errors import SourceError
from hallulens_tasks.jsonl import read_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    sha256: str | None = None  # None: the publisher gives none and the file changes


@dataclass(frozen=True)
class SourceSpec:
    name: str
    description: str
    accepts: str  # what `--source NAME=PATH` may point at
    files: tuple[RemoteFile, ...] = ()
    hf_dataset: str | None = None


GOODWIKI_HF = "euirim/goodwiki"
WIKIRANK_TITLES = "enwiki-2024.titles"
WIKIRANK_SCORES = "enwiki-2024-h.txt"
MEDICINE_CSV = "medicine_dataset.csv"
MEDICINE_COLUMNS = (
    "name",
    "substitute0",
    "substitute1",
    "substitute2",
    "substitute3",
    "substitute4",
)

SOURCES: dict[str, SourceSpec] = {
    "goodwiki": SourceSpec(
        "goodwiki",
        f"GoodWiki articles (Hugging Face {GOODWIKI_HF}, train split)",
        "a .parquet of the train split, or a .jsonl with title and document (or markdown)",
        hf_dataset=GOODWIKI_HF,
    ),
    "wikirank": SourceSpec(
        "wikirank",
        "WikiRank 2024 harmonic centrality of enwiki titles",
        f"a directory holding {WIKIRANK_TITLES} (or {WIKIRANK_TITLES}.txt) and {WIKIRANK_SCORES}",
        files=(
            RemoteFile(f"https://wikirank-2024.di.unimi.it/{WIKIRANK_TITLES}", WIKIRANK_TITLES),
            RemoteFile(
                f"https://wikirank-2024.di.unimi.it/rank/{WIKIRANK_SCORES}", WIKIRANK_SCORES
            ),
        ),
    ),
    "itis": SourceSpec(
        "itis",
        "ITIS taxonomy, MySQL tables dump",
        "itisMySQLTables.tar.gz, or a directory holding its hierarchy and longnames files",
        files=(
            RemoteFile(
                "https://www.itis.gov/downloads/itisMySQLTables.tar.gz", "itisMySQLTables.tar.gz"
            ),
        ),
    ),
    "medicines": SourceSpec(
        "medicines",
        "Kaggle 250k medicines (usage, side effects and substitutes)",
        f"the Kaggle .zip, or {MEDICINE_CSV}",
        files=(
            RemoteFile(
                "https://www.kaggle.com/api/v1/datasets/download/shudhanshusingh/"
                "250k-medicines-usage-side-effects-and-substitutes",
                "250k-medicines-usage-side-effects-and-substitutes.zip",
            ),
        ),
    ),
}


@dataclass(frozen=True)
class SourceFile:
    """One file a source was read from, as the manifest records it."""

    source: str
    path: str
    sha256: str
    origin: str = "local"  # "local", the download URL, or "hf:<dataset>"

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "path": self.path,
            "sha256": self.sha256,
            "origin": self.origin,
        }


def _record(source: str, path: Path, origin: str = "local") -> SourceFile:
    return SourceFile(source, str(path), sha256_file(path), origin)


def _spec(name: str) -> SourceSpec:
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}: choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def parse_source_args(values: Iterable[str]) -> dict[str, Path]:
    """`--source NAME=PATH` values as {name: path}; unknown names are errors (paths: in locate)."""
    local: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SourceError(
                f"--source {value!r}: expected NAME=PATH, e.g. itis=/data/itis.tar.gz"
            )
        spec = _spec(name.strip())
        local[spec.name] = Path(path.strip()).expanduser()
    return local


def locate(
    name: str,
    local: Mapping[str, str | os.PathLike] | None = None,
    cache: str | os.PathLike | None = None,
    *,
    progress: bool | TextIO = True,
) -> Path | None:
    """The path to read source `name` from: the local one if given, else the downloaded copy.

    None means "no file: load it from the Hugging Face hub" (goodwiki only). A source made of
    several files (wikirank) gives the directory holding them.
    """
    spec = _spec(name)
    if local and name in local:
        path = Path(local[name]).expanduser()
        if not path.exists():
            raise SourceError(f"--source {name}={path}: no such file or directory ({spec.accepts})")
        return path
    if not spec.files:
        return None
    root = source_cache_dir(cache) / name
    paths = [
        download(f.url, root / f.filename, sha256=f.sha256, source=name, progress=progress)
        for f in spec.files
    ]
    return paths[0] if len(paths) == 1 else root


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- GoodWiki


@dataclass(frozen=True)
class GoodWiki:
    """GoodWiki articles: dicts with pageid, title, revid, description, categories, document."""

    articles: list[dict]
    provenance: tuple[SourceFile, ...]


def _article(row: dict, where: str) -> dict:
    row = dict(row)
    if "document" not in row:
        if "markdown" not in row:
            raise SourceError(f"{where}: no document or markdown field")
        row["document"] = row.pop("markdown")  # upstream's rename (wikidata.py:49-64)
    title, document = row.get("title"), row.get("document")
    if not isinstance(title, str) or not title.strip():
        raise SourceError(f"{where}: title must be a non-empty string")
    if not isinstance(document, str):
        raise SourceError(f"{where}: document must be a string")
    return row


def _goodwiki_jsonl(path: Path) -> Iterator[dict]:
    for where, row in read_jsonl(path, SourceError):
        yield _article(row, where)


def _goodwiki_parquet(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{path}: not a readable parquet file ({_one_line(exc)})") from None
    columns = set(parquet.schema_arrow.names)
    missing = [name for name in ("title",) if name not in columns]
    if not columns & {"markdown", "document"}:
        missing.append("markdown")
    if missing:
        raise SourceError(
            f"{path}: missing column(s) {', '.join(missing)}; GoodWiki has pageid, title, "
            "revid, description, categories, markdown"
        )
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield _article(row, f"{path}: row {number}")
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{path}: row {number + 1}: {_one_line(exc)}") from None


def iter_goodwiki(path: str | os.PathLike) -> Iterator[dict]:
    """Articles of a local GoodWiki file (.parquet of the HF train split, or upstream's .jsonl)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _goodwiki_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return _goodwiki_jsonl(path)
    raise SourceError(f"{path}: goodwiki must be {SOURCES['goodwiki'].accepts}")


def _goodwiki_from_hub() -> GoodWiki:
    hint = f"download the train split of {GOODWIKI_HF} as parquet and pass --source goodwiki=PATH"
    try:
        import datasets

        data = datasets.load_dataset(GOODWIKI_HF, split="train")
    except Exception as exc:  # hub, network, cache: every failure gets the same way out
        raise SourceError(
            f"cannot load the Hugging Face dataset {GOODWIKI_HF} ({_one_line(exc)}): {hint}"
        ) from None
    articles = [_article(row, f"{GOODWIKI_HF} row {i}") for i, row in enumerate(data, start=1)]
    origin = f"hf:{GOODWIKI_HF}@{getattr(data, '_fingerprint', '?')}"
    files = tuple(_record("goodwiki", Path(f["filename"]), origin) for f in data.cache_files)
    return GoodWiki(articles, files)


def load_goodwiki(path: str | os.PathLike | None) -> GoodWiki:
    """GoodWiki from a local file, or (path None) from the HF hub via `datasets`.

    The hub route records the sha256 of the Arrow cache files `datasets` wrote, plus the
    dataset fingerprint, since the original parquet is not kept.
    """
    if path is None:
        return _goodwiki_from_hub()
    path = Path(path)
    articles = list(iter_goodwiki(path))
    if not articles:
        raise SourceError(f"{path}: no GoodWiki articles in the file")
    return GoodWiki(articles, (_record("goodwiki", path),))


# --------------------------------------------------------------------------- WikiRank


def normalize_title(title: str) -> str:
    """MediaWiki treats `_` and ` ` alike; dumps use one, GoodWiki the other."""
    return " ".join(title.replace("_", " ").split())


@dataclass(frozen=True)
class WikiRank:
    """Harmonic-centrality score by normalised title (see `normalize_title`)."""

    scores: dict[str, float]
    lines: int
    provenance: tuple[SourceFile, ...]


def wikirank_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(titles, scores) inside a WikiRank directory; upstream saved titles as `.titles.txt`."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: wikirank must be {SOURCES['wikirank'].accepts}")
    titles = next(
        (p for p in (path / WIKIRANK_TITLES, path / f"{WIKIRANK_TITLES}.txt") if p.is_file()), None
    )
    scores = path / WIKIRANK_SCORES
    missing = [str(path / WIKIRANK_TITLES)] if titles is None else []
    if not scores.is_file():
        missing.append(str(scores))
    if titles is None or missing:
        raise SourceError(f"{path}: missing {', '.join(missing)} ({SOURCES['wikirank'].accepts})")
    return titles, scores


def _lines(handle: TextIO) -> Iterator[str]:
    for line in handle:
        yield line.rstrip("\r\n")


def load_wikirank(path: str | os.PathLike, only: Iterable[str] | None = None) -> WikiRank:
    """Title → score from the two line-aligned WikiRank files.

    `only` (titles, normalised here) keeps just those: the full list has millions of titles.
    A title listed twice after normalisation keeps its first score.
    """
    titles_path, scores_path = wikirank_files(path)
    wanted = None if only is None else {normalize_title(t) for t in only}
    scores: dict[str, float] = {}
    count = 0
    try:
        with (
            open(titles_path, encoding="utf-8", newline="\n") as titles,
            open(scores_path, encoding="utf-8", newline="\n") as values,
        ):
            title_lines, score_lines = _lines(titles), _lines(values)
            for count, (title, value) in enumerate(zip_longest(title_lines, score_lines), 1):
                if title is None or value is None:  # one file ended first: count the other
                    n_titles = count - (title is None) + sum(1 for _ in title_lines)
                    n_scores = count - (value is None) + sum(1 for _ in score_lines)
                    raise SourceError(
                        f"{titles_path} has {n_titles:,} lines but {scores_path} has "
                        f"{n_scores:,}: the two files must be line-aligned (one WikiRank release)"
                    )
                try:
                    score = float(value)
                    if not math.isfinite(score):
                        raise ValueError(value)
                except ValueError:
                    raise SourceError(
                        f"{scores_path}:{count}: not a number: {value[:60]!r}"
                    ) from None
                key = normalize_title(title)
                if key and (wanted is None or key in wanted):
                    scores.setdefault(key, score)
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{titles_path} / {scores_path}: cannot read: {_one_line(exc)}") from None
    provenance = (_record("wikirank", titles_path), _record("wikirank", scores_path))
    return WikiRank(scores, count, provenance)


# --------------------------------------------------------------------------- popularity bins


@dataclass(frozen=True)
class PopularityBins:
    """Decile bins of GoodWiki h-scores; h_score_cat 0 = least popular.

    Titles missing from WikiRank are in `missing`, not in any bin (upstream gave them h-score
    -1 and so bin 0).
    """

    edges: tuple[float, ...]
    h_score: dict[str, float]
    h_score_cat: dict[str, int]
    missing: tuple[str, ...]

    def counts(self) -> list[int]:
        counts = [0] * (len(self.edges) - 1)
        for cat in self.h_score_cat.values():
            counts[cat] += 1
        return counts

    def manifest(self) -> dict:
        return {
            "edges": list(self.edges),
            "counts": self.counts(),
            "missing_count": len(self.missing),
            "missing": list(self.missing),
        }


def popularity_bins(
    titles: Iterable[str], scores: Mapping[str, float], n_bins: int = 10
) -> PopularityBins:
    """Cut the WikiRank scores of `titles` into `n_bins` quantile bins.

    Edges are `numpy.quantile` (linear) of the matched scores, recomputed from the data rather
    than upstream's hard-coded BINS_RES; bins are right-inclusive like upstream's `pd.cut`
    (a score equal to an edge goes to the lower bin). `scores` is keyed by normalised title.
    """
    import numpy as np

    matched: dict[str, float] = {}
    missing: list[str] = []
    for title in dict.fromkeys(titles):
        score = scores.get(normalize_title(title))
        if score is None:
            missing.append(title)
        else:
            matched[title] = score
    if len(matched) < n_bins:
        raise SourceError(
            f"only {len(matched)} of {len(matched) + len(missing)} GoodWiki titles are in "
            f"WikiRank, too few for {n_bins} bins: check that the WikiRank files are "
            "enwiki-2024.titles and enwiki-2024-h.txt"
        )
    if missing and len(missing) > 0.1 * (len(matched) + len(missing)):
        log.warning(
            "%d of %d GoodWiki titles are not in WikiRank; they are left out of every bin",
            len(missing),
            len(matched) + len(missing),
        )
    values = np.array(list(matched.values()), dtype=np.float64)
    edges = np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1))
    cats = np.searchsorted(edges[1:-1], values, side="left")
    return PopularityBins(
        edges=tuple(float(e) for e in edges),
        h_score=matched,
        h_score_cat={t: int(c) for t, c in zip(matched, cats, strict=True)},
        missing=tuple(missing),
    )


# --------------------------------------------------------------------------- ITIS


@dataclass(eq=False)
class Taxon:
    """A node of the ITIS tree (a TSN); `name` is None when longnames lacks the TSN."""

    tsn: int
    parent: Taxon | None = field(default=None, repr=False)
    children: list[Taxon] = field(default_factory=list, repr=False)
    name: str | None = None


@dataclass(frozen=True)
class Itis:
    """The ITIS tree from `hierarchy` plus every name of `longnames`."""

    nodes: dict[int, Taxon]  # in order of first appearance in hierarchy
    roots: list[Taxon]  # kingdoms
    names: frozenset[str]  # every longnames name, in the tree or not (synonyms too)
    provenance: tuple[SourceFile, ...]

    def kingdom(self, name: str) -> Taxon:
        for root in self.roots:
            if root.name == name:
                return root
        known = ", ".join(sorted(r.name or str(r.tsn) for r in self.roots))
        raise SourceError(f"ITIS has no kingdom {name!r} (it has {known})")

    def leaves(self, kingdom: str) -> list[Taxon]:
        """Taxa without children under `kingdom`, by TSN (not by file order)."""
        leaves, stack = [], [self.kingdom(kingdom)]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children)
            else:
                leaves.append(node)
        return sorted(leaves, key=lambda n: n.tsn)


_ITIS_KINDS = ("hierarchy", "longnames")


def _itis_kind(filename: str) -> str | None:
    """`hierarchy` / `longnames` for those dump files (any extension), else None."""
    stem = os.path.basename(filename).split(".")[0].lower()
    return stem if stem in _ITIS_KINDS else None


def _parse_hierarchy(handle: Iterable[str], where: str) -> tuple[dict[int, Taxon], list[Taxon]]:
    nodes: dict[int, Taxon] = {}
    roots: list[Taxon] = []
    for number, line in enumerate(handle, start=1):
        path = line.split("|", 1)[0].strip()
        if not path:
            continue
        try:
            codes = [int(code) for code in path.split("-")]
        except ValueError:
            raise SourceError(
                f"{where}:{number}: column 1 {path[:60]!r} is not a dash-separated TSN path"
            ) from None
        parent = None
        for code in codes:
            node = nodes.get(code)
            if node is None:  # a TSN keeps the parent of its first path, as upstream
                node = nodes[code] = Taxon(code, parent)
                (parent.children if parent else roots).append(node)
            parent = node
    return nodes, roots


def _parse_longnames(handle: Iterable[str], where: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        code, sep, name = line.partition("|")
        try:
            tsn = int(code)
        except ValueError:
            tsn = None
        if not sep or tsn is None or not name.strip():
            raise SourceError(f"{where}:{number}: expected TSN|name, got {line.strip()[:60]!r}")
        names[tsn] = name.strip()
    return names


def _itis_text(raw) -> TextIO:
    return io.TextIOWrapper(raw, encoding="ISO-8859-1", newline="")


def _read_itis_tar(path: Path) -> dict[str, object]:
    parsed: dict[str, object] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                kind = _itis_kind(member.name)
                if kind is None or not member.isfile():
                    continue
                if kind in parsed:
                    raise SourceError(f"{path}: more than one {kind} file in the archive")
                where = f"{path}[{member.name}]"
                with _itis_text(tar.extractfile(member)) as text:
                    parser = _parse_hierarchy if kind == "hierarchy" else _parse_longnames
                    parsed[kind] = parser(text, where)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceError(f"{path}: not a readable .tar.gz ({_one_line(exc)})") from None
    return parsed


def _read_itis_dir(path: Path) -> tuple[dict[str, object], list[Path]]:
    found: dict[str, list[Path]] = {kind: [] for kind in _ITIS_KINDS}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        kind = _itis_kind(file.name)
        if kind:
            found[kind].append(file)
    parsed: dict[str, object] = {}
    files = []
    for kind, paths in found.items():
        if len(paths) > 1:
            raise SourceError(f"{path}: more than one {kind} file: {', '.join(map(str, paths))}")
        if paths:
            parser = _parse_hierarchy if kind == "hierarchy" else _parse_longnames
            try:
                with open(paths[0], encoding="ISO-8859-1", newline="") as text:
                    parsed[kind] = parser(text, str(paths[0]))
            except OSError as exc:
                raise SourceError(f"{paths[0]}: cannot read: {_one_line(exc)}") from None
            files.append(paths[0])
    return parsed, files


def load_itis(path: str | os.PathLike) -> Itis:
    """The ITIS tree from `itisMySQLTables.tar.gz` or a directory holding its two files.

    Lines are ISO-8859-1. `hierarchy`: `|`-separated, column 1 the dash-separated TSN path from
    the kingdom down to the taxon. `longnames`: `TSN|name`.
    """
    path = Path(path)
    if path.is_dir():
        parsed, files = _read_itis_dir(path)
    else:
        parsed, files = _read_itis_tar(path), [path]
    missing = [kind for kind in _ITIS_KINDS if kind not in parsed]
    if missing:
        raise SourceError(
            f"{path}: no {' or '.join(missing)} file in it ({SOURCES['itis'].accepts})"
        )
    nodes, roots = parsed["hierarchy"]  # type: ignore[misc]
    names: dict[int, str] = parsed["longnames"]  # type: ignore[assignment]
    if not nodes:
        raise SourceError(f"{path}: the hierarchy file is empty")
    for tsn, node in nodes.items():
        node.name = names.get(tsn)
    provenance = tuple(_record("itis", f) for f in files)
    return Itis(nodes, roots, frozenset(names.values()), provenance)


# --------------------------------------------------------------------------- medicines


@dataclass(frozen=True)
class Medicines:
    """Non-empty values of `name` and `substitute0..4`, per column, in file order."""

    columns: dict[str, list[str]]
    rows: int
    provenance: tuple[SourceFile, ...]

    def names(self) -> list[str]:
        """All values, column after column (name, then substitute0, ...), as upstream lists them."""
        return [value for column in MEDICINE_COLUMNS for value in self.columns[column]]


def _parse_medicines(text: TextIO, where: str) -> tuple[dict[str, list[str]], int]:
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if header is None:
            raise SourceError(f"{where}: empty file")
        header = [h.strip() for h in header]
        missing = [c for c in MEDICINE_COLUMNS if c not in header]
        if missing:
            raise SourceError(f"{where}:1: missing column(s) {', '.join(missing)}")
        index = {c: header.index(c) for c in MEDICINE_COLUMNS}
        columns: dict[str, list[str]] = {c: [] for c in MEDICINE_COLUMNS}
        rows = 0
        for row in reader:
            if not row:
                continue
            if len(row) > len(header):
                raise SourceError(
                    f"{where}:{reader.line_num}: {len(row)} fields, the header has {len(header)}"
                )
            rows += 1
            for column, i in index.items():  # short rows: missing fields are empty (as pandas)
                value = row[i].strip() if i < len(row) else ""
                if value:
                    columns[column].append(value)
    except csv.Error as exc:
        raise SourceError(f"{where}:{reader.line_num}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"{where}:{reader.line_num + 1}: not UTF-8 ({exc.reason})") from None
    return columns, rows


def _medicine_member(path: Path, archive: zipfile.ZipFile) -> str:
    csvs = [n for n in archive.namelist() if n.lower().endswith(".csv")]
    exact = [n for n in csvs if os.path.basename(n) == MEDICINE_CSV]
    if len(exact) == 1:
        return exact[0]
    if len(csvs) == 1:
        return csvs[0]
    raise SourceError(
        f"{path}: expected one {MEDICINE_CSV} in the archive, found {', '.join(csvs) or 'no CSV'}"
    )


def load_medicines(path: str | os.PathLike) -> Medicines:
    """The medicine names of Kaggle's 250k medicines data, from its .zip or from the CSV."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = _medicine_member(path, archive)
                with archive.open(member) as raw:
                    text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
                    columns, rows = _parse_medicines(text, f"{path}[{member}]")
        else:
            with open(path, encoding="utf-8-sig", newline="") as text:
                columns, rows = _parse_medicines(text, str(path))
    except (OSError, zipfile.BadZipFile) as exc:
        raise SourceError(f"{path}: cannot read: {_one_line(exc)}") from None
    if not rows:
        raise SourceError(f"{path}: no medicines in the file")
    return Medicines(columns, rows, (_record("medicines", path),))


# --------------------------------------------------------------------------- one entry point

_LOADERS = {
    "goodwiki": load_goodwiki,
    "wikirank": load_wikirank,
    "itis": load_itis,
    "medicines": load_medicines,
}


def load_source(
    name: str,
    local: Mapping[str, str | os.PathLike] | None = None,
    cache: str | os.PathLike | None = None,
    *,
    progress: bool | TextIO = True,
    **options,
) -> GoodWiki | WikiRank | Itis | Medicines:
    """Locate (download if needed) and load source `name`; `options` go to its loader.

    Files that came from the cache record their download URL as origin in the provenance.
    """
    path = locate(name, local, cache, progress=progress)
    loaded = _LOADERS[name](path, **options)
    if path is None or (local and name in local):
        return loaded
    urls = {f.filename: f.url for f in SOURCES[name].files}
    provenance = tuple(
        replace(f, origin=urls.get(Path(f.path).name, f.origin)) for f in loaded.provenance
    )
    return replace(loaded, provenance=provenance)


def provenance_manifest(*loaded: GoodWiki | WikiRank | Itis | Medicines) -> list[dict]:
    """The `sources` list of a manifest: one entry per file read."""
    return [f.as_dict() for source in loaded for f in source.provenance]
