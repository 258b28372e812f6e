"""LongWiki's judging, upstream's FactHalu in four stages over a whole task at once.

1. abstention: is the answer knowledgeable (`{"is_knowledgeable": bool}`)? If not, it is refused;
2. claim extraction, per sentence of the knowledgeable answers (`claims.py`); an answer
   without any claim is refused too, as upstream;
3. retrieval of the 5 best passages per claim from the Wikipedia database (`retrieval.py`);
4. verification of each claim against its passages (`{"is_supported": bool}`), the passages in
   upstream's order: the best one last, next to the claim.

Each LLM stage is one batch through the judge (cached, resumable, re-asking unreadable replies).
An answer whose abstention, claim or verification reply stays unreadable is `unparseable`: no
other stage works on it and it is left out of every rate. An answer with an unsupported claim is
`hallucinated`, otherwise `correct`. The outcome keeps every sentence with its span in the
answer, its claims, each claim's evidence (page title and passage number) and verdict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from hallulens_capture.options import checked_number
from hallulens_tasks.judging.claims import TEMPLATE as CLAIMS_TEMPLATE
from hallulens_tasks.judging.claims import extraction_items, split_sentences, unique_claims
from hallulens_tasks.judging.judge import Judge, JudgeItem, flag_item, judged_entry
from hallulens_tasks.judging.retrieval import PassageIndex, candidate_pages
from hallulens_tasks.judging.wikipedia import WikiDB, WikiDBError, locate_db
from hallulens_tasks.llm.spec import LLMError

log = logging.getLogger(__name__)

ENV_K = "HALLULENS_LONGWIKI_K"
DEFAULT_K = 32  # upstream's --k: Recall@K counts supported claims up to K
ROLES = {
    "abstention": "judge_longwiki_abstention.jinja",
    "claims": CLAIMS_TEMPLATE,
    "verification": "judge_longwiki_verification.jinja",
}


def recall_k() -> int:
    """K of Recall@K and F1@K: `$HALLULENS_LONGWIKI_K`, else upstream's 32."""
    raw = os.environ.get(ENV_K, "").strip()
    if not raw:
        return DEFAULT_K
    return int(checked_number(ENV_K, raw, minimum=1, integer=True, error=LLMError))


def check_pages(db: WikiDB, topics: Sequence[str]) -> None:
    """Every topic must be a page: upstream kept only GoodWiki titles that the DB holds."""
    missing = sorted(set(db.missing(dict.fromkeys(topics))))
    if missing:
        shown = ", ".join(repr(t) for t in missing[:3])
        raise WikiDBError(
            f"{len(missing)} LongWiki topic(s) are not pages of {db.path} ({shown}"
            f"{', ...' if len(missing) > 3 else ''}): the prompt set was not made from this "
            "database (build sets with `hallulens generate longwiki --exclude-titles FILE` "
            "listing the titles it lacks)"
        )


def open_wiki(docs: Sequence[dict]) -> WikiDB:
    """The checked database for the answers about `docs`' topics."""
    topics = [doc["title"] for doc in docs]
    db = WikiDB(locate_db(topics))
    try:
        check_pages(db, topics)
    except WikiDBError:
        db.close()
        raise
    return db


def _verification_item(claim: str, passages: list) -> JudgeItem:
    shown = [{"title": p.title, "text": p.text} for p in reversed(passages)]  # best one last
    return flag_item(ROLES["verification"], {"claim": claim, "passages": shown}, "is_supported")


def _label(outcome: dict) -> str:
    abstention = outcome["judgements"]["abstention"]["verdict"]
    if abstention is None:
        return "unparseable"
    if not abstention:
        return "refused"
    sentences = outcome["sentences"]
    if any(s["claims"] is None for s in sentences):
        return "unparseable"
    verdicts = [c["supported"] for s in sentences for c in s["claims"]]
    if not verdicts:
        return "refused"  # no claim at all: upstream counts it as abstained
    if None in verdicts:
        return "unparseable"
    return "correct" if all(verdicts) else "hallucinated"


def judge_answers(judge: Judge, docs: Sequence[dict], responses: Sequence[str]) -> list[dict]:
    """Outcomes of LongWiki answers (see the module docstring)."""
    k = recall_k()
    with open_wiki(docs) as db:
        index = PassageIndex(db)
        try:
            return _stages(judge, db, index, docs, responses, k)
        finally:
            index.close()


def _stages(
    judge: Judge,
    db: WikiDB,
    index: PassageIndex,
    docs: Sequence[dict],
    responses: Sequence[str],
    k: int,
) -> list[dict]:
    abstentions = judge.run(
        [
            flag_item(
                ROLES["abstention"],
                {"prompt": doc["prompt"].strip(), "generation": response},
                "is_knowledgeable",
            )
            for doc, response in zip(docs, responses, strict=True)
        ]
    )
    outcomes = [
        {"k": k, "judgements": {"abstention": judged_entry(j)}, "sentences": []}
        for j in abstentions
    ]
    knowledgeable = [d for d, j in enumerate(abstentions) if j.verdict is True]
    extracted = _extract_claims(judge, knowledgeable, responses, outcomes)
    claims = _gather_evidence(db, index, docs, outcomes, extracted)
    for (claim, _), judgement in zip(claims, judge.run([i for _, i in claims]), strict=True):
        claim.update(supported=judgement.verdict, raw=judgement.raw, attempts=judgement.attempts)
    for outcome in outcomes:
        outcome["label"] = _label(outcome)
    return outcomes


def _extract_claims(
    judge: Judge, knowledgeable: list[int], responses: Sequence[str], outcomes: list[dict]
) -> dict[int, list[tuple[int, list[str] | None]]]:
    """Stage 2: per answer, (sentence index, its facts or None if unreadable) of each sentence
    asked about; the sentences, with their spans and extraction replies, go into `outcomes`."""
    asked: list[tuple[int, int, JudgeItem]] = []
    for d in knowledgeable:
        sentences = split_sentences(responses[d])
        outcomes[d]["sentences"] = [
            {"text": s.text, "span": [s.start, s.end], "claims": []} for s in sentences
        ]
        asked.extend((d, i, item) for i, item in extraction_items(sentences).items())
    extracted: dict[int, list[tuple[int, list[str] | None]]] = {}
    for (d, i, _), judgement in zip(asked, judge.run([a[2] for a in asked]), strict=True):
        outcomes[d]["sentences"][i]["extraction"] = {
            "raw": judgement.raw,
            "attempts": judgement.attempts,
        }
        extracted.setdefault(d, []).append((i, judgement.verdict))
    return extracted


def _gather_evidence(
    db: WikiDB,
    index: PassageIndex,
    docs: Sequence[dict],
    outcomes: list[dict],
    extracted: dict[int, list[tuple[int, list[str] | None]]],
) -> list[tuple[dict, JudgeItem]]:
    """Stage 3: each answer's unique claims with their evidence, in `outcomes`; returns every
    claim with its verification item. An answer with an unreadable extraction gets none."""
    claims: list[tuple[dict, JudgeItem]] = []
    unmatched = 0
    for d, found in extracted.items():
        sentences = outcomes[d]["sentences"]
        if any(facts is None for _, facts in found):
            for i, facts in found:
                if facts is None:
                    sentences[i]["claims"] = None
            continue  # unparseable: nothing more is asked about this answer
        topic = docs[d]["title"]
        unique = unique_claims([facts for _, facts in found])
        texts = [(i, text) for (i, _), kept in zip(found, unique, strict=True) for text in kept]
        pages = candidate_pages(db, topic, docs[d]["prompt"])
        ranked = index.rank(pages, [f"{topic} {text}" for _, text in texts])
        for (i, text), passages in zip(texts, ranked, strict=True):
            unmatched += not passages
            claim = {
                "claim": text,
                "evidence": [{"title": p.title, "passage": p.index} for p in passages],
            }
            sentences[i]["claims"].append(claim)
            claims.append((claim, _verification_item(text, passages)))
    if unmatched:
        log.warning(
            "LongWiki: %d claim(s) share no word with any passage of their candidate pages "
            "(the topic and the titles in the question); they are verified without evidence",
            unmatched,
        )
    return claims


def answer_scores(outcome: dict) -> dict[str, float]:
    """Upstream's per-answer values of an answered (not refused) answer: precision = supported
    share of its claims, recall@K = min(supported / K, 1), their F1 (0 when both are 0), and
    the number of claims."""
    verdicts = [c["supported"] for s in outcome["sentences"] for c in s["claims"]]
    supported = sum(verdicts)
    precision = supported / len(verdicts)
    recall = min(supported / outcome["k"], 1.0)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {
        "precision": precision,
        "recall_at_k": recall,
        "f1_at_k": f1,
        "n_claims": float(len(verdicts)),
    }
