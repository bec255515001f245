"""Boxes drawn on images for the report: the reference in green, the prediction in red."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from chiasm.data.sample import Sample
from chiasm.grounding.scorer import reference


def draw_boxes(image: Image.Image, boxes: list[tuple[tuple[float, float, float, float], str]],
               width: int = 3) -> Image.Image:
    """A copy of ``image`` with each (box, colour) outlined."""
    out = image.convert("RGB").copy()
    pen = ImageDraw.Draw(out)
    for box, colour in boxes:
        pen.rectangle([round(v) for v in box], outline=colour, width=width)
    return out


def draw_prediction(sample: Sample, prediction: str, out_path: Path) -> Path | None:
    """The sample's first image with its reference box (green) and the predicted box (red), saved as PNG."""
    ref = reference(sample)
    if ref is None or not sample.images:
        return None
    box, size, fmt = ref
    boxes = [(box, "#00b000")]
    got = fmt.parse(prediction, size)
    if got is not None:
        boxes.append((got, "#e00000"))
    with Image.open(sample.images[0]) as im:
        drawn = draw_boxes(im, boxes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    drawn.save(out_path)
    return out_path
