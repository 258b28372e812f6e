"""Read verdicts out of what real LLM judges write.

Judges are asked for JSON (`{"is_abstaining": true}`) or a label (`CORRECT`), and write it with
spaces, in any case, inside code fences, after some chatter, or as a bare "Yes". These parsers
accept all of that and return None when the reply does not say one thing clearly: an
unparseable reply is counted as such by the caller, never guessed into a verdict.
"""

from __future__ import annotations

import re

LABELS = ("correct", "incorrect", "unverifiable")

_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False}
_LEADING_YES_NO = re.compile(r"^[\s*_\"'`(\[]*(yes|no)\b(?![-'])", re.IGNORECASE)
_LABEL = re.compile(r"\b(correct|incorrect|unverifiable)\b", re.IGNORECASE)
_LEADING_LABEL = re.compile(
    r"^[\s*_\"'`(\[{]*(correct|incorrect|unverifiable)\b(?!\s*[/|])", re.IGNORECASE
)
_MARKER = re.compile(
    r"(?:judge?ment|verdict|label|answer)[\"']?\s*[:=][\s*_\"'`(\[]*"
    r"(correct|incorrect|unverifiable)\b",
    re.IGNORECASE,
)
_NEGATED = re.compile(r"\bnot\s+(?:be\s+)?(?:correct|incorrect|unverifiable)\b", re.IGNORECASE)


def _leading_yes_no(text: str) -> bool | None:
    match = _LEADING_YES_NO.match(text)
    return None if match is None else match.group(1).lower() == "yes"


def parse_flag(text: str, key: str, yes_means: bool = True) -> bool | None:
    """The boolean `key` of a JSON-style verdict, or a bare Yes/No; None when unclear."""
    if not isinstance(text, str) or not text.strip():
        return None
    pattern = re.compile(
        r"[\"']?\b" + re.escape(key) + r"\b[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9.]+)",
        re.IGNORECASE,
    )
    found = set()
    for match in pattern.finditer(text):
        value = _BOOL_WORDS.get(match.group(1).lower())
        if value is None:
            return None  # the key is there with something that is not a yes/no value
        found.add(value)
    leading = _leading_yes_no(text)
    if leading is not None:
        found.add(leading if yes_means else not leading)
    return found.pop() if len(found) == 1 else None


def parse_label(text: str) -> str | None:
    """CORRECT / INCORRECT / UNVERIFIABLE (or a bare Yes/No) as a lower-case label; else None."""
    if not isinstance(text, str) or not text.strip():
        return None
    leading = _LEADING_LABEL.match(text)
    if leading is not None:
        return leading.group(1).lower()
    yes_no = _leading_yes_no(text)
    if yes_no is not None:
        return "correct" if yes_no else "incorrect"
    marked = _MARKER.findall(text)
    if marked:
        return marked[-1].lower()
    if _NEGATED.search(text):
        return None
    labels = {m.lower() for m in _LABEL.findall(text)}
    return labels.pop() if len(labels) == 1 else None


# LongWiki's claim extraction: one fact per line after "- ", or a sentence saying there is none
_BULLET = re.compile(r"^\s*[-*•]\s+(.*\S)\s*$")
_NO_FACTS = re.compile(
    r"^[\s*_\"'`-]*no\s+(?:available\s+facts?|verifiable\s+(?:claims?|facts?))[\s.*_\"'`!]*$",
    re.IGNORECASE,
)


def parse_claims(text: str) -> list[str] | None:
    """The facts of a claim-extraction reply (upstream's `- ` lines, also `* ` or `•`), [] for
    "No available facts." (or "No verifiable claim."), None for a reply that is neither."""
    if not isinstance(text, str) or not text.strip():
        return None
    lines = text.splitlines()
    claims = []
    for line in lines:
        bullet = _BULLET.match(line)
        if bullet is not None and not _NO_FACTS.match(bullet.group(1)):
            claims.append(bullet.group(1))
    if claims:
        return claims
    return [] if any(_NO_FACTS.match(line) for line in lines) else None
