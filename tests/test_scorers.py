"""VQA scorers: the VQAv2 normalisation, its soft accuracy, the synthetic world's scorer, per-type means."""

from __future__ import annotations

from pathlib import Path

import pytest

from chiasm.cli import main
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.eval import vqa
from chiasm.eval.scorers import get_scorer, normalise_vqa, soft_accuracy


def _sample(answer: str | None = None, answers: object = None, qtype: str = "what", sid: str = "q-1") -> Sample:
    meta: dict = {"question_type": qtype}
    if answer is not None:
        meta["answer"] = answer
    if answers is not None:
        meta["answers"] = answers
    return Sample(sid, [Turn("human", "<image>\nWhat?"), Turn("gpt", answer or "x")], meta=meta, source="vqa.json")


@pytest.mark.parametrize(("text", "normal"), [
    ("Two.", "2"),
    ("a dog", "dog"),
    ("The  Dog\n", "dog"),
    ("none", "0"),
    ("ten", "10"),
    ("top-left", "top left"),  # a mark inside a word becomes a space
    ("yes, it is", "yes it is"),  # a mark next to a space is deleted
    ("2.5", "2.5"),  # a period before a digit stays
    ("1,000", "1000"),  # a thousands comma: every mark is deleted
    ("an apple?", "apple"),
    ("Man's hat", "man's hat"),  # apostrophes are kept
])
def test_vqa_normalisation(text: str, normal: str) -> None:
    assert normalise_vqa(text) == normal


@pytest.mark.parametrize(("agreeing", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_matches_the_official_leave_one_out_numbers(agreeing: int, accuracy: float) -> None:
    # Ten human answers, ``agreeing`` of them the prediction. Official: for each answer left out,
    # min(matches among the other nine / 3, 1), averaged. With 3 agreeing: 3 subsets see 2 matches
    # (2/3 each) and 7 see 3 (1 each), so (3 * 2/3 + 7) / 10 = 0.9, not 1.
    references = ["Two"] * agreeing + ["three"] * (10 - agreeing)
    assert soft_accuracy("2.", references) == pytest.approx(accuracy)


def test_soft_accuracy_with_other_reference_counts() -> None:
    assert soft_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="at least 2 reference answers, got 1"):
        soft_accuracy("cat", ["cat"])


def test_vqa_soft_reads_strings_or_vqav2_annotation_objects() -> None:
    soft = get_scorer("vqa_soft")
    strings = _sample(answers=["dog"] * 2 + ["cat"] * 8)
    objects = _sample(answers=[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                               for i, a in enumerate(["dog"] * 2 + ["cat"] * 8)])
    assert soft.score("A dog.", strings) == pytest.approx(0.6) == soft.score("a dog", objects)


@pytest.mark.parametrize(("answers", "message"), [
    (None, r"\[file vqa.json, sample 'q-1'\] scorer vqa_soft: needs \"answers\""),
    (["dog"], "at least 2 reference answers"),
    (["dog", 3], r"answers\[1\] must be text"),
    ([{"text": "dog"}, "dog"], r"answers\[0\] must be text or an object with an 'answer'"),
])
def test_vqa_soft_refuses_samples_without_usable_answers(answers: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        get_scorer("vqa_soft").score("dog", _sample(answers=answers))


def test_exact_and_synthetic_scorers_differ_only_in_normalisation() -> None:
    exact, synthetic = get_scorer("exact"), get_scorer("synthetic")
    assert exact.score("Two.", _sample("2")) == 1.0 == synthetic.score("Two.", _sample("2"))
    assert exact.score("red circle", _sample("red")) == 0.0 == synthetic.score("red circle", _sample("red"))
    # The synthetic normaliser keeps inner punctuation; VQAv2's drops a comma before a space.
    assert exact.score("top, left", _sample("top left")) == 1.0
    assert synthetic.score("top, left", _sample("top left")) == 0.0
    # The reference is the last assistant turn when meta has no "answer".
    assert exact.score("the x", Sample("s", [Turn("human", "q"), Turn("gpt", "X")])) == 1.0


def test_score_means_overall_and_per_type_and_full_credit_hits() -> None:
    samples = [_sample(answers=["dog"] * 3 + ["cat"] * 7, qtype="animal", sid="a"),
               _sample(answers=["dog"] * 10, qtype="animal", sid="b"),
               _sample(answers=["2"] * 10, qtype="count", sid="c")]
    scored = vqa.score(samples, ["dog", "dog", "3"], "vqa_soft")
    assert scored["scores"] == pytest.approx([0.9, 1.0, 0.0])
    assert scored["hits"] == [False, True, False]
    assert scored["overall"] == pytest.approx(1.9 / 3) and scored["n"] == 3
    assert scored["per_type"] == pytest.approx({"animal": 0.95, "count": 0.0})
    with pytest.raises(ValueError, match="unknown VQA scorer 'soft'; known: exact, iou, synthetic, vqa_soft"):
        vqa.score(samples, ["dog", "dog", "3"], "soft")


def test_chiasm_eval_refuses_an_unknown_scorer_before_loading_a_model(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--model", str(tmp_path / "absent"), "--scorer", "fuzzy"]) == 2
    assert "unknown VQA scorer 'fuzzy'; known: exact, iou, synthetic, vqa_soft" in capsys.readouterr().err
