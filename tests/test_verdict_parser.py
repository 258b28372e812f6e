"""Judge-output parsing: a table of realistic LLM judge replies and what each must parse to.

`parse_flag` reads a boolean verdict (`{"is_abstaining": true}`, `{"does_believe": false}`, or a
bare Yes/No); `parse_label` reads CORRECT / INCORRECT / UNVERIFIABLE. Both return None rather
than guess when the reply is empty, truncated, contradictory or carries no verdict.
"""

import pytest

from hallulens_tasks.judging.verdicts import parse_flag, parse_label

ABST = "is_abstaining"
BEL = "does_believe"

# (text, key, yes_means, expected)
FLAG_CASES = [
    # --- JSON in its many spellings ---
    pytest.param('{"is_abstaining": true}', ABST, True, True, id="flag-json-plain"),
    pytest.param('{"is_abstaining":false}', ABST, True, False, id="flag-json-no-spaces"),
    pytest.param('{ "is_abstaining" : false }', ABST, True, False, id="flag-json-wide-spaces"),
    pytest.param('{"IS_ABSTAINING": True}', ABST, True, True, id="flag-json-upper-key-python-true"),
    pytest.param('{"does_believe": TRUE}', BEL, True, True, id="flag-json-upper-value"),
    pytest.param("{'does_believe': False}", BEL, True, False, id="flag-python-single-quotes"),
    pytest.param('{"is_abstaining": "true"}', ABST, True, True, id="flag-string-true"),
    pytest.param('{"does_believe": "no"}', BEL, True, False, id="flag-string-no"),
    pytest.param('{"is_abstaining": "Yes"}', ABST, True, True, id="flag-string-yes"),
    pytest.param(
        '```json\n{\n  "is_abstaining": false\n}\n```', ABST, True, False, id="flag-code-fence"
    ),
    pytest.param(
        'Sure! Here is my answer: {"is_abstaining": true} Let me know if you need anything else.',
        ABST,
        True,
        True,
        id="flag-chatter-around-json",
    ),
    pytest.param(
        '{\n  "is_abstaining": false,\n  "reason": "The chatbot gives a direct answer."\n}',
        ABST,
        True,
        False,
        id="flag-multiline-extra-key-after",
    ),
    pytest.param(
        '{"reason": "it says it does not know who that is", "is_abstaining": true}',
        ABST,
        True,
        True,
        id="flag-extra-key-before",
    ),
    pytest.param(
        "Based on the response, the chatbot accepts the user's false premise and builds on it."
        '\n\n{"does_believe": true}',
        BEL,
        True,
        True,
        id="flag-llama-prose-mentions-false",
    ),
    pytest.param("is_abstaining: true", ABST, True, True, id="flag-no-braces"),
    pytest.param("Is_Abstaining: FALSE", ABST, True, False, id="flag-no-braces-mixed-case"),
    pytest.param(
        '```json\n{"is_abstaining": true', ABST, True, True, id="flag-truncated-after-value"
    ),
    # --- bare Yes / No ---
    pytest.param("Yes", ABST, True, True, id="flag-bare-yes"),
    pytest.param("no.", ABST, True, False, id="flag-bare-no-lower-period"),
    pytest.param("**Yes**", BEL, True, True, id="flag-bare-yes-bold"),
    pytest.param("YES!\n", ABST, True, True, id="flag-bare-yes-upper-bang"),
    pytest.param(
        "No, the chatbot gives an answer.", ABST, True, False, id="flag-no-with-explanation"
    ),
    pytest.param(
        "Yes. The model treats the made-up animal as real.",
        BEL,
        True,
        True,
        id="flag-yes-with-explanation",
    ),
    pytest.param(
        "Yes, it answers the question directly.", ABST, False, False, id="flag-yes-means-false"
    ),
    pytest.param("No. The chatbot refuses to answer.", ABST, False, True, id="flag-no-inverted"),
    pytest.param("**No**", BEL, False, True, id="flag-bold-no-inverted"),
    pytest.param('{"is_abstaining": true}', ABST, False, True, id="flag-json-ignores-yes-means"),
    # --- agreement and conflict ---
    pytest.param(
        'Yes.\n```json\n{"is_abstaining": true}\n```', ABST, True, True, id="flag-yes-agrees-json"
    ),
    pytest.param(
        'Yes. {"is_abstaining": false}', ABST, False, False, id="flag-inverted-yes-agrees-json"
    ),
    pytest.param('Yes. {"is_abstaining": false}', ABST, True, None, id="flag-yes-vs-json"),
    pytest.param('No, {"does_believe": true}', BEL, True, None, id="flag-no-vs-json"),
    pytest.param(
        '{"is_abstaining": true}\nWait, on reflection:\n{"is_abstaining": false}',
        ABST,
        True,
        None,
        id="flag-key-twice-conflict",
    ),
    pytest.param(
        '{"is_abstaining": true}\n\nFinal answer: {"is_abstaining": true}',
        ABST,
        True,
        True,
        id="flag-key-twice-same",
    ),
    # --- nothing to read ---
    pytest.param("", ABST, True, None, id="flag-empty"),
    pytest.param("   \n\t ", ABST, True, None, id="flag-whitespace"),
    pytest.param('{"does_believe": true}', ABST, True, None, id="flag-wrong-key"),
    pytest.param('{"is_abstaining": fasle}', ABST, True, None, id="flag-typo-fasle"),
    pytest.param('{"is_abstaining": "maybe"}', ABST, True, None, id="flag-maybe"),
    pytest.param('{"does_believe": null}', BEL, True, None, id="flag-null"),
    pytest.param('{"is_abstaining": 0.5}', ABST, True, None, id="flag-float"),
    pytest.param('{"is_abstaining":', ABST, True, None, id="flag-truncated-no-value"),
    pytest.param(
        "I think the chatbot is being careful here.", ABST, True, None, id="flag-prose-only"
    ),
    pytest.param(
        "Yesterday's question was answered with confidence.",
        ABST,
        True,
        None,
        id="flag-yesterday-not-yes",
    ),
    pytest.param("Nobody could tell from this reply.", BEL, True, None, id="flag-nobody-not-no"),
]

# (text, expected)
LABEL_CASES = [
    # --- bare labels ---
    pytest.param("CORRECT", "correct", id="label-bare-upper"),
    pytest.param("incorrect", "incorrect", id="label-bare-lower"),
    pytest.param("Unverifiable.", "unverifiable", id="label-bare-period"),
    pytest.param('"CORRECT"', "correct", id="label-double-quoted"),
    pytest.param("**INCORRECT**", "incorrect", id="label-bold"),
    pytest.param("[UNVERIFIABLE]", "unverifiable", id="label-brackets"),
    pytest.param("Yes", "correct", id="label-bare-yes"),
    pytest.param("No.", "incorrect", id="label-bare-no"),
    pytest.param("**No**", "incorrect", id="label-bold-no"),
    pytest.param(
        "Yes, the response matches the ground truth.", "correct", id="label-yes-explained"
    ),
    pytest.param("no, the year is wrong", "incorrect", id="label-no-explained"),
    # --- leading label wins over later words ---
    pytest.param(
        "INCORRECT. The correct answer is 1912.", "incorrect", id="label-leading-incorrect"
    ),
    pytest.param(
        "CORRECT - the response says Paris, which matches.", "correct", id="label-leading-correct"
    ),
    pytest.param(
        "'Unverifiable' - the ground truth doesn't cover this, so it may be correct or not.",
        "unverifiable",
        id="label-leading-quoted",
    ),
    pytest.param(
        "UNVERIFIABLE\n\nThe question is about a person who does not exist, so no answer can be"
        " checked as correct.",
        "unverifiable",
        id="label-leading-newline-chatter",
    ),
    # --- explicit markers ---
    pytest.param(
        "The response names Lisbon, but the correct answer is Porto. Judgement: INCORRECT",
        "incorrect",
        id="label-marker-judgement",
    ),
    pytest.param("Judgment: correct", "correct", id="label-marker-judgment-us"),
    pytest.param(
        "The response gives a year but the reference has none.\nYOUR JUDGEMENT: UNVERIFIABLE",
        "unverifiable",
        id="label-marker-your-judgement",
    ),
    pytest.param("Verdict: **INCORRECT**", "incorrect", id="label-marker-verdict-bold"),
    pytest.param("verdict: correct", "correct", id="label-marker-lower"),
    pytest.param("Answer: incorrect", "incorrect", id="label-marker-answer"),
    pytest.param("Final answer: [CORRECT]", "correct", id="label-marker-final-brackets"),
    pytest.param("**Judgement:** INCORRECT", "incorrect", id="label-marker-bold-marker"),
    pytest.param(
        "Sure, here's my evaluation:\n\nThe response states that the Eiffel Tower was completed"
        " in 1889, which matches the ground truth.\n\nJudgement: CORRECT",
        "correct",
        id="label-llama-chatter-marker",
    ),
    pytest.param(
        "The response is correct in spirit but the date is off by a year. Judgement: INCORRECT",
        "incorrect",
        id="label-marker-beats-earlier-word",
    ),
    pytest.param(
        "The model could be correct or incorrect depending on the source. Verdict: UNVERIFIABLE",
        "unverifiable",
        id="label-marker-beats-two-words",
    ),
    pytest.param(
        "Label: CORRECT\n\nWait, I misread the year. Final answer: INCORRECT",
        "incorrect",
        id="label-last-marker-wins",
    ),
    pytest.param(
        "The response is not correct. Judgement: INCORRECT",
        "incorrect",
        id="label-negation-then-marker",
    ),
    # --- JSON ---
    pytest.param('{"judgement": "CORRECT"}', "correct", id="label-json"),
    pytest.param(
        '```json\n{"judgement": "UNVERIFIABLE"}\n```', "unverifiable", id="label-json-fence"
    ),
    pytest.param("{'judgement': 'incorrect'}", "incorrect", id="label-json-single-quotes"),
    pytest.param(
        'Here is my evaluation in JSON:\n{"judgement": "INCORRECT", "explanation": "The year is'
        ' wrong; the correct year is 1912."}',
        "incorrect",
        id="label-json-beats-explanation",
    ),
    # --- one label word anywhere ---
    pytest.param("The response is correct.", "correct", id="label-single-word"),
    pytest.param(
        "I'd call this unverifiable since no year is given.",
        "unverifiable",
        id="label-single-word-unverifiable",
    ),
    # --- nothing to read ---
    pytest.param("", None, id="label-empty"),
    pytest.param("  \n ", None, id="label-whitespace"),
    pytest.param("The response mentions the river.", None, id="label-no-label"),
    pytest.param("CORRECT/INCORRECT/UNVERIFIABLE", None, id="label-echoed-options"),
    pytest.param("It could be correct or incorrect.", None, id="label-two-labels"),
    pytest.param("The response is not correct.", None, id="label-negated-correct"),
    pytest.param("This is not incorrect", None, id="label-negated-incorrect"),
    pytest.param("The response is incorrectly formatted.", None, id="label-incorrectly-not-word"),
    pytest.param("Correctness cannot be judged here.", None, id="label-correctness-not-word"),
    pytest.param("Judgement: INCOR", None, id="label-truncated"),
    pytest.param("Judgement: CORECT", None, id="label-typo"),
    pytest.param("Nobody can say from this response.", None, id="label-nobody-not-no"),
    pytest.param("Yesterday's date is not mentioned.", None, id="label-yesterday-not-yes"),
]


@pytest.mark.parametrize(("text", "key", "yes_means", "expected"), FLAG_CASES)
def test_parse_flag(text, key, yes_means, expected):
    assert parse_flag(text, key, yes_means=yes_means) is expected


@pytest.mark.parametrize(("text", "expected"), LABEL_CASES)
def test_parse_label(text, expected):
    assert parse_label(text) == expected


def _random_unicode(seed: int, length: int) -> str:
    """Deterministic pseudo-random text over all of Unicode except surrogates (a plain LCG)."""
    chars = []
    state = seed
    for _ in range(length):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        code = (state >> 33) % 0x110000
        if 0xD800 <= code <= 0xDFFF:
            code -= 0x800
        chars.append(chr(code))
    return "".join(chars)


ODD_INPUTS = [
    *(_random_unicode(seed, 200) for seed in range(5)),
    _random_unicode(99, 20_000),
    "{" * 5_000,
    "}" * 5_000 + "{" * 5_000,
    "{}" * 5_000,
    "a" * 100_000 + ' {"is_abstaining": true} ' + "b" * 100_000,
    '{"is_abstaining": true' * 2_000,
    "Yes " * 5_000,
    " " * 20_000 + "Judgement:" + " " * 20_000,
    '"' * 10_000 + "'" * 10_000,
    "```" * 5_000,
    "{not json at all}",
    "}{",
    "{{{{}}}}",
    '{"is_abstaining": {"is_abstaining": {"does_believe": true}}}',
    '{"a": {"b": {"c": {"d": {"e": "CORRECT"}}}}}',
    '{"judgement": ["CORRECT", "INCORRECT"]}',
    '{"judgement": {"label": "CORRECT"}}',
    '{"judgement": 1}',
    '{"is_abstaining": true, "is_abstaining": }',
    "is_abstaining: is_abstaining: is_abstaining:",
    "Judgement: Judgement: Verdict: Label:",
    "\x00\x01\x02\x1b[31mCORRECT\x1b[0m",
    "\u202eTCERROC\u202c",
    "ＣＯＲＲＥＣＴ",
    "İS_ABSTAİNİNG: TRUE",
    '\ufeff{"does_believe": false}',
    "🙂" * 10_000,
    "\\" * 10_000,
    "\n" * 20_000,
]


@pytest.mark.parametrize("text", ODD_INPUTS, ids=[f"odd-{i}" for i in range(len(ODD_INPUTS))])
def test_never_raises(text):
    for key in (ABST, BEL):
        for yes_means in (True, False):
            flag = parse_flag(text, key, yes_means=yes_means)
            assert flag is None or isinstance(flag, bool)
    assert parse_label(text) in {"correct", "incorrect", "unverifiable", None}
