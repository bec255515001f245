"""The ``iou`` VQA scorer: a predicted box is a hit when its IoU with the reference is >= 0.5.

The reference box is ``meta["box"]`` (pixels, [x0, y0, x1, y1]) on an image of
``meta["image_size"]`` (width, height), written by the grounding worlds; the box style of the
text is ``meta["box_style"]`` (``int1000`` by default, see :mod:`chiasm.grounding.boxes`).
Averaged by the evaluator, the scores are Acc@0.5; :func:`grounding_summary` adds mean IoU.
Samples of a mixed set without a box are scored by exact match, so one eval file may hold
box answers and text answers.
"""

from __future__ import annotations

from chiasm.data.sample import DataError, Sample
from chiasm.eval.scorers import SCORERS, ExactMatch, Scorer
from chiasm.grounding.boxes import BoxFormat, check_box, iou

IOU_HIT = 0.5


def reference(sample: Sample) -> tuple[tuple[float, float, float, float], tuple[int, int], BoxFormat] | None:
    """(box, image size, format) of a grounding sample; None for a sample without ``meta['box']``."""
    if "box" not in sample.meta:
        return None
    size = sample.meta.get("image_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise DataError("scorer iou: a sample with 'box' needs 'image_size': [width, height]",
                        source=sample.source, sample_id=sample.id)
    size = (int(size[0]), int(size[1]))
    box = check_box(sample.meta["box"], size, source=sample.source, sample_id=sample.id)
    return box, size, BoxFormat(sample.meta.get("box_style", "int1000"))


def prediction_iou(prediction: str, sample: Sample) -> float | None:
    """IoU of the first box in ``prediction`` with the sample's; 0 if none parses; None if no reference."""
    ref = reference(sample)
    if ref is None:
        return None
    box, size, fmt = ref
    got = fmt.parse(prediction, size)
    return 0.0 if got is None else iou(got, box)


@SCORERS.register("iou")
class IoUScorer(Scorer):
    """Full credit when the predicted box overlaps the reference with IoU >= 0.5 (else exact match)."""

    name = "iou"

    def score(self, prediction: str, sample: Sample) -> float:
        value = prediction_iou(prediction, sample)
        if value is None:
            return ExactMatch().score(prediction, sample)
        return float(value >= IOU_HIT)

    def check(self, sample: Sample) -> None:
        if reference(sample) is None:
            super().check(sample)


def grounding_summary(samples: list[Sample], predictions: list[str]) -> dict[str, float | int]:
    """Acc@0.5 and mean IoU over the samples that carry a box."""
    values = [v for s, p in zip(samples, predictions, strict=True)
              if (v := prediction_iou(p, s)) is not None]
    n = len(values)
    return {"n_boxes": n, "acc_at_0_5": sum(v >= IOU_HIT for v in values) / n if n else 0.0,
            "mean_iou": sum(values) / n if n else 0.0}
