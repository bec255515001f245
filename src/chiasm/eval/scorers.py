"""VQA scorers: how one generated answer is scored against a sample's reference answer(s).

A scorer is chosen by exact name (``EvalConfig.scorer``) in :data:`SCORERS`:

- ``exact`` (default): 1 if the prediction equals the reference after :func:`normalise_vqa`,
  else 0. The reference is ``meta["answer"]`` or else the last assistant turn.
- ``vqa_soft``: the VQAv2 accuracy over several human answers (``meta["answers"]``), see
  :func:`soft_accuracy`.
- ``synthetic``: the synthetic world's own normaliser (``chiasm.synthetic.answers``),
  imported only when named.
- ``iou``: a box answer is a hit at IoU >= 0.5 (Acc@0.5), see ``chiasm.grounding.scorer``.

Scores lie in ``[0, 1]``; a sample counts as a *hit* only with full credit.
"""

from __future__ import annotations

import re
from typing import Any

from chiasm.data.sample import DataError, Sample
from chiasm.registry import Registry


def truth_of(sample: Sample) -> str:
    """The reference answer: ``meta['answer']`` or else the last assistant turn.

    A number is its text ("how many" answers); a list, object, boolean or null is refused: its
    Python spelling ("[1, 2]", "True") would be scored as if it were the answer.
    """
    if "answer" in sample.meta:
        answer = sample.meta["answer"]
        if isinstance(answer, str) or (isinstance(answer, (int, float)) and not isinstance(answer, bool)):
            return str(answer)
        raise DataError(f"'answer' must be text or a number, got {answer!r}", source=sample.source,
                        sample_id=sample.id)
    return next(t.text for t in reversed(sample.conversations) if t.role == "gpt")


class Scorer:
    """Scores a prediction for a sample; subclasses implement :meth:`score`."""

    name = ""

    def score(self, prediction: str, sample: Sample) -> float:
        raise NotImplementedError

    def check(self, sample: Sample) -> None:
        """Raise a DataError if ``sample`` lacks what :meth:`score` reads; run on every sample before answering."""
        truth_of(sample)


SCORERS: Registry[Scorer] = Registry("VQA scorer", plugins={"synthetic": "chiasm.synthetic.answers",
                                                                 "iou": "chiasm.grounding.scorer"})


def get_scorer(name: str) -> Scorer:
    """The scorer registered under exactly ``name``; a ValueError listing the known ones otherwise."""
    if name not in SCORERS:
        raise ValueError(f"unknown VQA scorer {name!r}; known: {', '.join(SCORERS.names())}")
    return SCORERS.get(name)()


# ---- the VQAv2 evaluation's answer normalisation ----------------------------------------
# The steps of the official evaluation, so that scores compare with published VQAv2 numbers:
# punctuation marks are deleted where they touch a space (or in a text with a thousands
# comma) and become spaces inside words ("top-left" -> "top left"); a period is dropped
# unless a digit follows ("2.5" stays); then lower case, number words to digits ("none"
# counts as 0, as there), articles dropped. The official step that restores apostrophes in
# a fixed list of contractions ("dont" -> "don't") is not taken.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_THOUSANDS = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})


def normalise_vqa(text: str) -> str:
    """``text`` in the VQAv2 evaluation's normal form (see the comment above)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    glued = _THOUSANDS.search(text) is not None
    for mark in _PUNCTUATION:
        if glued or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES)


@SCORERS.register("exact")
class ExactMatch(Scorer):
    """Full credit when the normalised prediction equals the normalised reference."""

    name = "exact"

    def score(self, prediction: str, sample: Sample) -> float:
        return float(normalise_vqa(prediction) == normalise_vqa(truth_of(sample)))


def soft_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2 accuracy: ``min(#references equal to the prediction / 3, 1)``, averaged over the
    leave-one-out subsets of the references (the 10 choose 9 subsets of VQAv2's ten answers).

    With ten references, a prediction that 1, 2, 3 or 4+ of them gave scores 0.3, 0.6, 0.9
    and 1.0: the averaging is why three agreeing humans do not give full credit.
    """
    if len(references) < 2:
        raise ValueError(f"soft accuracy needs at least 2 reference answers, got {len(references)}")
    pred = normalise_vqa(prediction)
    same = [normalise_vqa(r) == pred for r in references]
    total = sum(same)
    return sum(min(1.0, (total - hit) / 3) for hit in same) / len(same)


def reference_answers(sample: Sample) -> list[str]:
    """``meta["answers"]``: a list of strings, or of VQAv2 annotation objects ``{"answer": ...}``."""
    raw: Any = sample.meta.get("answers")

    def fail(why: str) -> DataError:
        return DataError(f"scorer vqa_soft: {why}", source=sample.source, sample_id=sample.id)

    if not isinstance(raw, list) or len(raw) < 2:
        raise fail('needs "answers": a list of at least 2 reference answers (VQAv2 has 10)')
    answers = []
    for k, item in enumerate(raw):
        text = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise fail(f"answers[{k}] must be text or an object with an 'answer' text, got {item!r}")
        answers.append(text)
    return answers


@SCORERS.register("vqa_soft")
class VQASoftAccuracy(Scorer):
    """VQAv2-style soft accuracy against the sample's several human answers."""

    name = "vqa_soft"

    def score(self, prediction: str, sample: Sample) -> float:
        return soft_accuracy(prediction, reference_answers(sample))

    def check(self, sample: Sample) -> None:
        reference_answers(sample)
