"""Invented GoodWiki/WikiRank sources and a scripted generator for `hallulens generate` tests.

Sixty articles, six per popularity decile (WikiRank score = index, so decile = index // 6).
Each article has a kind that decides what the scripted generator replies about it:
- good: a question, then a short answer (PreciseWikiQA) or a 4-sentence answer (LongWiki);
- unanswerable: the answer is "Unanswerable." (capitalised: upstream's case-sensitive check
  kept it);
- wordy: a 13-word answer (PreciseWikiQA) or a 2-sentence answer (LongWiki);
- blank: the question is white space;
- sorry: the question starts "Unfortunately" (PreciseWikiQA) or is "[NO QUESTION]" (LongWiki).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PLACES = (
    "Varnholt", "Quillmere", "Ostrava Vale", "Brindlecombe", "Sallowmere", "Kettering Fen",
    "Durnacre", "Helmsby", "Ashgrove Tarn", "Pellworth",
)  # fmt: skip
# kinds of the six articles of each bin: bin 0 has 1 good, bin 1 has 2, the others 4
BIN0 = ("good", "unanswerable", "wordy", "blank", "sorry", "unanswerable")
BIN1 = ("good", "good", "wordy", "unanswerable", "sorry", "blank")
OTHER = ("good", "good", "good", "unanswerable", "wordy", "good")
N_ARTICLES = 60


def title(i: int) -> str:
    return f"{PLACES[i % len(PLACES)]} {i:02d}"


def kind(i: int) -> str:
    b = i // 6
    return (BIN0 if b == 0 else BIN1 if b == 1 else OTHER)[i % 6]


KINDS = {title(i): kind(i) for i in range(N_ARTICLES)}
UNRANKED = "Unranked Hamlet"  # in GoodWiki, not in WikiRank: in no bin, never asked about
KINDS[UNRANKED] = "good"


def _paragraph(name: str, topic: str, sentences: int) -> str:
    return " ".join(
        f"The {topic} of {name} was recorded in entry {k}, which the town clerk kept in the "
        f"archive beside the old mill for visitors to read."
        for k in range(sentences)
    )


def document(i: int) -> str:
    """About 120 tokens of lead, 300 of history, 300 of geography, 60 of references."""
    name = title(i)
    return (
        f"LEAD {name}. {_paragraph(name, 'founding', 5)}\n\n"
        f"## History\n\n{_paragraph(name, 'history', 13)}\n\n"
        f"## Geography\n\n{_paragraph(name, 'geography', 13)}\n\n"
        f"## References\n\n* Invented source one for {name}.\n* Invented source two."
    )


def write_wiki_sources(root: Path) -> dict[str, Path]:
    """goodwiki.jsonl and a wikirank directory (titles with underscores, as WikiRank has)."""
    root.mkdir(parents=True, exist_ok=True)
    goodwiki = root / "goodwiki.jsonl"
    with open(goodwiki, "w", encoding="utf-8") as f:
        for i in range(N_ARTICLES + 1):
            row = {
                "pageid": 1000 + i,
                "title": title(i) if i < N_ARTICLES else UNRANKED,
                "revid": 5000 + i,
                "description": f"An invented place, number {i}.",
                "categories": ["Invented places"],
                "markdown": document(i),
            }
            f.write(json.dumps(row) + "\n")
    wikirank = root / "wikirank"
    wikirank.mkdir(exist_ok=True)
    order = list(range(N_ARTICLES))[::-1]  # file order is not score order
    (wikirank / "enwiki-2024.titles").write_text(
        "".join(title(i).replace(" ", "_") + "\n" for i in order) + "Not_In_GoodWiki\n"
    )
    (wikirank / "enwiki-2024-h.txt").write_text(
        "".join(f"{float(i)}\n" for i in order) + "99999.0\n"
    )
    return {"goodwiki": goodwiki, "wikirank": wikirank}


def source_args(paths: dict[str, Path]) -> list[str]:
    return [arg for name, path in paths.items() for arg in ("--source", f"{name}={path}")]


WORDY = "It is the old stone bridge that crosses the river near the market town"
LONG_ANSWER = "It began as a ford. A mill followed. The town grew around it. Trade came later."


def _question(prompt: str) -> str:
    name = re.search(r'about "(.+?)"', prompt).group(1)
    essay = "essay" in prompt.split("\n")[0]
    if KINDS[name] == "blank":
        return "  \n "
    if KINDS[name] == "sorry":
        return "[NO QUESTION]" if essay else "Unfortunately, I cannot write a question."
    return f" What is recorded about {name}?\n"


def _asked(prompt: str) -> str:
    return re.search(r"Question: What is recorded about (.+)\?$", prompt).group(1)


def scripted_precise(prompt: str) -> str:
    """The generator's PreciseWikiQA replies, from the article's kind."""
    if prompt.startswith("You are writing"):
        return _question(prompt)
    name = _asked(prompt)
    if KINDS[name] == "unanswerable":
        return "Unanswerable."
    return WORDY if KINDS[name] == "wordy" else f" Entry {name[-2:]} "


def scripted_longwiki(prompt: str) -> str:
    """The generator's LongWiki replies, from the article's kind."""
    if prompt.startswith("You are writing"):
        return _question(prompt)
    name = _asked(prompt)
    if KINDS[name] == "unanswerable":
        return "unanswerable"
    return "It began as a ford. A mill followed." if KINDS[name] == "wordy" else LONG_ANSWER


FACTS = (
    ("harbour", "was built in 1842 by a merchant named Elias Brandt"),
    ("bridge", "was designed by the engineer Mara Voss"),
    ("church", "has a bell tower painted bright green"),
    ("castle", "was captured in 1611 by Count Ruprecht"),
    ("market", "is held every Tuesday in the square"),
    ("river", "is called the Oss"),
)


def write_small_wiki_sources(root: Path, per_bin: int = 10) -> dict[str, Path]:
    """Ten short articles per decile (one section each), for a real small model."""
    root.mkdir(parents=True, exist_ok=True)
    goodwiki = root / "goodwiki.jsonl"
    count = 10 * per_bin
    with open(goodwiki, "w", encoding="utf-8") as f:
        for i in range(count):
            thing, fact = FACTS[i % len(FACTS)]
            text = (
                f"{title(i)} is a small village on the northern coast. "
                f"The village {thing} {fact}. About three hundred people live there."
            )
            f.write(json.dumps({"title": title(i), "document": text}) + "\n")
    wikirank = root / "wikirank"
    wikirank.mkdir(exist_ok=True)
    (wikirank / "enwiki-2024.titles").write_text("".join(title(i) + "\n" for i in range(count)))
    (wikirank / "enwiki-2024-h.txt").write_text("".join(f"{i}.0\n" for i in range(count)))
    return {"goodwiki": goodwiki, "wikirank": wikirank}
