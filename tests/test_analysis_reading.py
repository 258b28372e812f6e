"""The selection vocabulary and the Python API on real stores: every reduction against numpy on
the raw record arrays, streaming in small batches, exclusions reported, bad selections refused."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import Sample, rows_for, write_store

from hallulens_analysis import Selection, SelectionError, build_plan, collect, open_store, stream
from hallulens_capture.errors import RecordFormatError

HIDDEN = 8
# first stored position per scope, for a P-token prompt (by hand, README table)
FIRST = {
    "all": lambda p: 0,
    "prompt": lambda p: 0,
    "generated": lambda p: p,
    "response": lambda p: p - 1,
}


def sample(i: int, scope: str = "all", n_prompt: int = 5, n_generated: int = 4, **kw) -> Sample:
    rng = np.random.default_rng(i)
    layers = len(kw.get("layer_ids") or range(4))
    rows = rows_for(scope, n_prompt, n_generated)
    acts = rng.standard_normal((layers, rows, HIDDEN)).astype(np.float16)
    return Sample(f"question {i}?", acts, n_prompt, n_generated, scope=scope, doc_id=i, **kw)


def by_hand(raw: np.ndarray, scope: str, n_prompt: int, n_generated: int, name: str):
    """Expected reduction of all layers, indexing rows by position as the README defines them."""
    row = lambda position: position - FIRST[scope](n_prompt)  # noqa: E731
    p, g = n_prompt, n_generated
    if name == "last-prompt":
        return raw[:, row(p - 1)]
    if name == "first":
        return raw[:, row(p)]
    if name == "last":
        return raw[:, row(p + g - 2)]
    if name == "second-last":
        return raw[:, row(p + g - 3)]
    if name == "mean":
        return raw[:, row(p) : row(p + g - 1)].astype(np.float64).mean(axis=1)
    raise AssertionError(name)


@pytest.mark.parametrize("scope", ["all", "response", "generated"])
def test_every_reduction_equals_numpy_on_the_raw_record(tmp_path, scope):
    samples = [
        sample(
            i,
            scope,
            n_prompt=3 + i,
            n_generated=3 + i % 4,
            label=["correct", "hallucinated"][i % 2],
        )
        for i in range(6)
    ]
    write_store(tmp_path / "s", samples)
    names = ["first", "last", "second-last", "mean", "window:4"]
    if scope != "generated":
        names.append("last-prompt")
    selection = Selection.parse("all", names)
    with open_store(tmp_path / "s") as store:
        arrays = collect(store, selection)
        assert arrays.keys == sorted(store.keys())  # store order
        for n, key in enumerate(arrays.keys):
            record = store[key]
            raw = record.all_layers_activations
            p, g = len(record.prompt_token_ids), len(record.generated_token_ids)
            for name in names:
                if name == "window:4":
                    fed = g - 1
                    want = np.zeros((raw.shape[0], 4, HIDDEN), np.float32)
                    start = p - FIRST[scope](p)
                    want[:, : min(4, fed)] = raw[:, start : start + min(4, fed)]
                    np.testing.assert_array_equal(arrays.features["window-4"][n], want)
                    assert arrays.masks["window-4"][n].tolist() == [j < fed for j in range(4)]
                    continue
                got = arrays.features[name.replace(":", "-")][n]
                np.testing.assert_allclose(
                    got, by_hand(raw, scope, p, g, name), rtol=1e-6, atol=1e-6
                )
            assert arrays.lengths[n] == g and arrays.prompt_lengths[n] == p
        labels = store.labels()
        assert arrays.y.tolist() == [int(labels[k]["label"] == "hallucinated") for k in arrays.keys]


def test_bfloat16_and_layer_subsets_and_negative_ids(tmp_path):
    rng = np.random.default_rng(0)
    bits = rng.integers(0x3000, 0x4000, size=(3, 3, HIDDEN), dtype=np.uint16)  # plain numbers
    write_store(
        tmp_path / "s",
        [Sample("q?", bits, 2, 2, dtype="bfloat16", layer_ids=[4, 6, 9], label="correct")],
    )
    with open_store(tmp_path / "s") as store:
        arrays = collect(store, Selection.parse("-1,4", ["first"]))
        assert arrays.plan.layer_ids == (4, 9)  # -1 counts back from the top stored layer
        as_float = (bits.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(arrays.X[0], as_float[[0, 2], 2])  # position P = row 2
        with pytest.raises(
            SelectionError, match=r"layer 5 was not captured \(the store holds layers 4,6,9\)"
        ):
            build_plan(store, Selection.parse("5"))
        with pytest.raises(SelectionError, match="layer 10 is out of range"):
            build_plan(store, Selection.parse("10"))


def test_streaming_batches_are_bounded_and_equal_to_collect(tmp_path):
    write_store(tmp_path / "s", [sample(i, label="correct") for i in range(7)])
    selection = Selection.parse("1-3", ["mean", "window:3"])
    with open_store(tmp_path / "s") as store:
        whole = collect(store, selection)
        plan = build_plan(store, selection)
        per_row = 4 * 3 * HIDDEN * (1 + 3)  # float32 mean + window, 3 layers
        sizes = []
        for b in stream(store, plan, budget_bytes=2 * per_row):  # buffers reused: check each now
            sizes.append(b.rows.stop - b.rows.start)
            for name, values in b.features.items():
                np.testing.assert_array_equal(values, whole.features[name][b.rows])
            np.testing.assert_array_equal(b.masks["window-3"], whole.masks["window-3"][b.rows])
        assert sizes == [2, 2, 2, 1]


def test_groups_repeats_and_exclusions_are_counted(tmp_path):
    samples = [
        sample(0, label="hallucinated"),
        sample(0, label="correct"),  # same prompt again: key -1, same question
        sample(1, label="refused"),
        sample(2),  # not labelled
        sample(3, n_generated=2, label="correct"),  # too short for second-last
        sample(4, label="unparseable"),
    ]
    keys = write_store(tmp_path / "s", samples)
    assert keys[1] == keys[0] + "-1"
    with open_store(tmp_path / "s") as store:
        plan = build_plan(store, Selection.parse(reductions=["second-last"]), require_target=True)
        assert plan.excluded == {
            "label none outside the target": 1,
            "label refused outside the target": 1,
            "label unparseable outside the target": 1,
            "response too short for second-last": 1,
        }
        assert sorted(i.key for i in plan.items) == sorted(keys[:2])
        assert len(set(plan.groups())) == 1  # repeats of one question share a group
        every = build_plan(store, Selection.parse(reductions=["mean"]))  # an export's view
        assert every.label_counts() == {
            "correct": 2,
            "hallucinated": 1,
            "none": 1,
            "refused": 1,
            "unparseable": 1,
        }
        assert [i.y for i in every.items if not i.label] == [-1]
        only = build_plan(store, Selection.parse(labels=["none", "refused"]))
        assert sorted(i.label for i in only.items) == ["", "refused"]


class Words:
    """A tokenizer stand-in: token id i decodes to WORDS[i]."""

    WORDS = ("<eos>", "The", " capital", " is", " PARIS", ",", " France", ".")

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.WORDS[i] for i in ids if not (skip_special_tokens and i == 0))


def test_answer_reduction_finds_the_gold_tokens(tmp_path):
    ids = [1, 2, 3, 4, 5, 6, 7, 0]  # "The capital is PARIS, France." then EOS
    rng = np.random.default_rng(3)
    acts = rng.standard_normal((2, 4 + len(ids) - 1, HIDDEN)).astype(np.float16)
    common = {"generated_token_ids": ids, "label": "correct"}
    write_store(
        tmp_path / "s",
        [
            Sample("q1", acts, 4, len(ids), answer="paris, france", **common),
            Sample("q2", acts, 4, len(ids), answer="Lyon", **common),
            Sample("q3", acts, 4, len(ids), **common),
            Sample(
                "q4",
                acts,
                4,
                len(ids),
                answer="Paris",
                label="hallucinated",
                generated_token_ids=ids,
            ),
        ],
    )
    with open_store(tmp_path / "s") as store:
        arrays = collect(store, Selection.parse(reductions=["answer"]), tokenizer=Words())
        assert arrays.plan.excluded == {
            "gold answer not in the response (reduction answer)": 1,
            "no gold answer (reduction answer)": 1,
        }
        by_key = dict(zip(arrays.keys, arrays.X, strict=True))
        q1 = next(k for k in arrays.keys if store[k].prompt == "q1")
        # tokens 3..5 spell " PARIS, France": states at positions P+3 .. P+5 (rows, scope all)
        want = acts[:, 4 + 3 : 4 + 6].astype(np.float64).mean(axis=1)
        np.testing.assert_allclose(by_key[q1], want, rtol=1e-6, atol=1e-6)
        q4 = next(k for k in arrays.keys if store[k].prompt == "q4")
        np.testing.assert_array_equal(by_key[q4], acts[:, 4 + 3].astype(np.float32))
        with pytest.raises(SelectionError, match="needs the model's tokenizer"):
            build_plan(store, Selection.parse(reductions=["answer"]))


def test_last_prompt_from_a_prompt_capture(tmp_path):
    write_store(tmp_path / "s", [sample(0, "prompt", n_prompt=6, label="correct")])
    with open_store(tmp_path / "s") as store:
        arrays = collect(store, Selection.parse(reductions=["last-prompt"]))
        raw = store[arrays.keys[0]].all_layers_activations  # a view: valid while open
        np.testing.assert_array_equal(arrays.X[0], raw[:, 5])  # position P - 1 = row 5


@pytest.mark.parametrize(
    ("scope", "reduction", "fix"),
    [
        (
            "generated",
            "last-prompt",
            "capture_tokens=response (one extra state per record), all or prompt",
        ),
        ("prompt", "mean", "capture_tokens=generated, response or all"),
    ],
)
def test_reductions_the_capture_scope_cannot_give_name_the_setting(tmp_path, scope, reduction, fix):
    write_store(tmp_path / "s", [sample(0, scope, label="correct")])
    with open_store(tmp_path / "s") as store, pytest.raises(SelectionError) as info:
        build_plan(store, Selection.parse(reductions=[reduction]))
    message = str(info.value)
    assert f"(capture_tokens={scope}) does not hold: capture with {fix}" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"reductions": ["median"]}, "unknown reduction 'median'"),
        ({"reductions": ["window:0"]}, "the window needs N >= 1"),
        ({"layers": "1-x"}, "layers: '1-x' is not a layer id or range"),
        ({"target": "hallucinated"}, "expected POSITIVE:NEGATIVE labels"),
        ({"target": "wrong:correct"}, "unknown label 'wrong'"),
        ({"target": "correct:correct"}, "a label is on both sides"),
        ({"labels": ["good"]}, "label 'good' is not known"),
    ],
)
def test_bad_selections_are_one_line_errors(kwargs, fragment):
    with pytest.raises(SelectionError) as info:
        Selection.parse(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_empty_target_class_says_which_labels_there_are(tmp_path):
    write_store(
        tmp_path / "s",
        [sample(i, label=["hallucinated", "refused"][i % 2], task="nonsense_x") for i in range(4)],
    )
    with open_store(tmp_path / "s") as store:
        with pytest.raises(SelectionError) as info:
            build_plan(store, Selection.parse(), require_target=True)
        assert str(info.value) == (
            "target hallucinated:correct: no correct record among the 4 selected (labels: "
            "hallucinated x2, refused x2) (entity tasks have no correct answers: "
            "try --target belief)"
        )
        plan = build_plan(store, Selection.parse(target="belief"), require_target=True)
        assert sorted(i.y for i in plan.items) == [0, 0, 1, 1]
        with pytest.raises(SelectionError, match="no record matches"):
            build_plan(store, Selection.parse(tasks=["precise_*"]))


def test_logprob_tensors_give_baseline_scores(tmp_path):
    logprobs = np.array([-0.1, -2.0, -0.5, -0.3], np.float32)
    entropy = np.array([0.2, 1.5, 0.1, 0.4], np.float32)
    write_store(
        tmp_path / "s",
        [
            sample(
                0,
                label="correct",
                optional={"generated_logprobs": logprobs, "generated_entropy": entropy},
            ),
            sample(1, label="correct"),
        ],
    )
    with open_store(tmp_path / "s") as store:
        plan = build_plan(store, Selection.parse())
        scores = {store[i.key].prompt: i.scores for i in plan.items}
    assert scores["question 0?"] == pytest.approx(
        {"neg_mean_logprob": 0.725, "neg_min_logprob": 2.0, "mean_entropy": 0.55}
    )
    assert scores["question 1?"] == {}
    write_store(
        tmp_path / "bad",
        [sample(0, label="correct", optional={"generated_logprobs": logprobs[:3]})],
    )
    with open_store(tmp_path / "bad") as store, pytest.raises(RecordFormatError) as info:
        build_plan(store, Selection.parse())
    assert "generated_logprobs has shape [3]" in str(info.value) and "[4]" in str(info.value)
