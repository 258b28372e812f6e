"""The one selection vocabulary of the Python API, the exports and the probe.

- layers: the capture syntax (`all`, `14-29`, `0,8,16`, `[0,8,16]`, negative ids), resolved
  against the layers the store holds; negative ids count back from the highest stored layer
  (the model's last layer when it was captured, as in `capture_layers`);
- token reductions, defined on the response's tokens: token j of a G-token response sits at
  position P + j (P prompt tokens), and its state is the one computed when it was fed back
  (the last generated token never is). `last-prompt` is position P - 1, the state that produced
  the first response token; `first` = P; `last` = P + G - 2 (the state that produced the last
  token); `second-last` = P + G - 3; `mean` over P .. P + G - 2; `window:N` the first N of
  those, zero-padded, with a mask; `answer` the mean over the states of the response tokens
  that spell the gold answer;
- records: tasks (shell patterns), labels (`none` = not labelled), and a binary target.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hallulens_analysis.errors import SelectionError
from hallulens_capture.errors import CaptureConfigError
from hallulens_capture.spec import parse_layers, resolve_layers

LABELS = ("correct", "hallucinated", "refused", "unparseable")
UNLABELLED = "none"  # the label filter's name for records without a label
TARGETS = {
    "hallucination": "hallucinated:correct",
    "refusal": "refused:correct,hallucinated",
    "belief": "hallucinated:refused",  # entity tasks: believes the made-up entity vs refuses
}
# reduction kind -> fewest generated tokens a record needs for it to have a state
_MIN_GENERATED = {
    "last-prompt": 1,
    "first": 2,
    "last": 2,
    "second-last": 3,
    "mean": 2,
    "answer": 2,
    "window": 1,
}
_WINDOW = re.compile(r"^window:(\d+)$")


@dataclass(frozen=True)
class Reduction:
    """One token reduction; `window` is N for `window:N`, else 0."""

    name: str
    window: int = 0

    @classmethod
    def parse(cls, text: str) -> Reduction:
        name = text.strip().lower()
        match = _WINDOW.match(name)
        if match:
            if int(match.group(1)) < 1:
                raise SelectionError(f"reduction {text!r}: the window needs N >= 1")
            return cls(name, int(match.group(1)))
        if name not in _MIN_GENERATED or name == "window":
            raise SelectionError(
                f"unknown reduction {text!r}: expected last-prompt, first, last, second-last, "
                "mean, window:N or answer"
            )
        return cls(name)

    @property
    def slug(self) -> str:
        """File and column name: `window:64` -> `window-64`."""
        return self.name.replace(":", "-")

    @property
    def min_generated(self) -> int:
        """Fewest generated tokens a record needs for this reduction to have a state."""
        return _MIN_GENERATED["window" if self.window else self.name]

    def offsets(self, n_generated: int, answer: tuple[int, int] | None = None) -> tuple[int, int]:
        """Positions [P + a, P + b) this reduction reads for a response of n_generated tokens."""
        fed = n_generated - 1  # response tokens that have a state
        if self.window:
            return 0, min(self.window, fed)
        return {
            "last-prompt": (-1, 0),
            "first": (0, 1),
            "last": (fed - 1, fed),
            "second-last": (fed - 2, fed - 1),
            "mean": (0, fed),
            "answer": answer or (0, 0),
        }[self.name]

    def scope_hint(self) -> str:
        """Which capture_tokens settings hold the positions this reduction reads."""
        if self.name == "last-prompt":
            return "capture_tokens=response (one extra state per record), all or prompt"
        return "capture_tokens=generated, response or all"


@dataclass(frozen=True)
class Target:
    """A binary target: labels that count as positive (y = 1) and as negative (y = 0)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Target:
        spec = TARGETS.get(text.strip().lower(), text.strip().lower())
        pos, sep, neg = spec.partition(":")
        sides = [tuple(x.strip() for x in part.split(",") if x.strip()) for part in (pos, neg)]
        if not sep or not all(sides):
            raise SelectionError(
                f"target {text!r}: expected POSITIVE:NEGATIVE labels (e.g. hallucinated:correct) "
                f"or one of {', '.join(TARGETS)}"
            )
        unknown = [x for side in sides for x in side if x not in LABELS]
        if unknown:
            raise SelectionError(f"target {text!r}: unknown label {unknown[0]!r} ({_LABEL_LIST})")
        if set(sides[0]) & set(sides[1]):
            raise SelectionError(f"target {text!r}: a label is on both sides")
        return cls(*sides)

    def y(self, label: str) -> int:
        """1 positive, 0 negative, -1 outside the target (other label or unlabelled)."""
        return 1 if label in self.positive else 0 if label in self.negative else -1

    @property
    def text(self) -> str:
        return f"{','.join(self.positive)}:{','.join(self.negative)}"

    def check_classes(self, labels: Sequence[str]) -> None:
        """Both classes must be present among `labels` (of the records selected before the
        target applies; the message lists them all)."""
        counts = Counter(label or UNLABELLED for label in labels)
        for side in (self.positive, self.negative):
            if not any(counts[label] for label in side):
                present = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                hint = ""
                if "correct" in side and "refused" in counts:
                    hint = " (entity tasks have no correct answers: try --target belief)"
                raise SelectionError(
                    f"target {self.text}: no {'/'.join(side)} record among the {len(labels)} "
                    f"selected (labels: {present}){hint}"
                )


_LABEL_LIST = f"labels are {', '.join(LABELS)}, or {UNLABELLED} for records without a label"


@dataclass(frozen=True)
class Selection:
    """Layers, token reductions, records and target, parsed once and checked early."""

    layers_text: str = "all"
    reductions: tuple[Reduction, ...] = (Reduction("mean"),)
    tasks: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    target: Target = Target(("hallucinated",), ("correct",))

    @classmethod
    def parse(
        cls,
        layers: object = "all",
        reductions: Iterable[str] | str = ("mean",),
        tasks: Iterable[str] = (),
        labels: Iterable[str] = (),
        target: str = "hallucination",
    ) -> Selection:
        reductions = [reductions] if isinstance(reductions, str) else list(reductions)
        if not reductions:
            raise SelectionError("no token reduction given (e.g. mean)")
        parsed = tuple(dict.fromkeys(Reduction.parse(r) for r in reductions))
        text = layers if isinstance(layers, str) else ",".join(str(v) for v in layers)  # type: ignore[union-attr]
        _parse_layer_text(text)
        labels = tuple(labels)
        unknown = [x for x in labels if x not in (*LABELS, UNLABELLED)]
        if unknown:
            raise SelectionError(f"label {unknown[0]!r} is not known ({_LABEL_LIST})")
        return cls(text, parsed, tuple(tasks), labels, Target.parse(target))

    def wants_task(self, task: str) -> bool:
        return not self.tasks or any(fnmatch.fnmatchcase(task, p) for p in self.tasks)

    def wants_label(self, label: str) -> bool:
        return not self.labels or (label or UNLABELLED) in self.labels

    def layer_ids(self, stored: Sequence[int]) -> tuple[int, ...]:
        """The selected layer ids, each one the store holds."""
        last = max(stored)
        try:
            ids = resolve_layers(
                _parse_layer_text(self.layers_text),
                last,
                "layers",
                f"a store whose top layer is {last}",
            )
        except CaptureConfigError as exc:
            raise SelectionError(str(exc)) from None
        missing = [i for i in ids if i not in stored]
        if missing:
            raise SelectionError(
                f"layers {self.layers_text}: layer {missing[0]} was not captured "
                f"(the store holds layers {compact(stored)})"
            )
        return ids

    def as_dict(self) -> dict[str, object]:
        return {
            "layers": self.layers_text,
            "reductions": [r.name for r in self.reductions],
            "tasks": list(self.tasks),
            "labels": list(self.labels),
            "target": self.target.text,
        }


def _parse_layer_text(text: str):
    try:
        return parse_layers(text, "layers")
    except CaptureConfigError as exc:
        raise SelectionError(str(exc)) from None


def compact(ids: Sequence[int]) -> str:
    """`0-30` for a contiguous run, else the ids joined by commas."""
    ids = [int(i) for i in ids]
    if ids and ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))
