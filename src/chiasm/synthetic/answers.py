"""The synthetic world's answer normaliser, registered as the ``synthetic`` VQA scorer.

The world's answers are single short words or phrases ("red", "2", "top left", "yes"), so
a prediction is compared after a light normalisation that forgives form (case, a trailing
period, a leading article, "two" for "2", "top-left") and nothing else.
"""

from __future__ import annotations

import re

from chiasm.data.sample import Sample
from chiasm.eval.scorers import SCORERS, Scorer, truth_of

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}


def normalise_answer(text: str) -> str:
    """Lower-case, drop trailing punctuation and a leading article, digits for number words."""
    text = text.strip().lower().replace("-", " ")
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"[\s.,;:!?]+$", "", text)
    text = re.sub(r"^(a|an|the) ", "", text)
    return " ".join(_NUMBERS.get(word, word) for word in text.split(" "))


def answer_matches(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalise_answer`; forgiving about form, strict about content."""
    return normalise_answer(prediction) == normalise_answer(answer)


@SCORERS.register("synthetic")
class SyntheticScorer(Scorer):
    """Full credit when :func:`answer_matches` the sample's single reference answer."""

    name = "synthetic"

    def score(self, prediction: str, sample: Sample) -> float:
        return float(answer_matches(prediction, truth_of(sample)))
