"""Boxes as text, in one documented convention, so questions and answers can carry them.

The convention follows Qwen-VL: a box is ``<box>(x0,y0),(x1,y1)</box>``, the top-left and
bottom-right corners, origin at the image's top left. Its numbers are, by config choice:

- ``int1000`` (Qwen-VL): integers in [0, 1000), the corner's fraction of the width / height
  times 1000, floored and clamped to 999 (so they never depend on the image's pixel size);
- ``fraction``: decimals in [0, 1] with ``digits`` places (3: finer than a pixel of a 1000-pixel side).

A box the LM writes is parsed back leniently (the first two coordinate pairs after
``<box>``, or anywhere when the tags are missing), but a box given as data is checked
strictly: outside the image, or with x1 < x0 / y1 < y0, is an error that names the sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from chiasm.data.sample import DataError

BoxStyle = Literal["int1000", "fraction"]
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
_NUM = r"(-?\d+(?:\.\d+)?)"
_PAIR = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,?\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")


@dataclass(frozen=True)
class BoxFormat:
    """How boxes are written as text: ``int1000`` or ``fraction`` (``digits`` decimal places)."""

    style: BoxStyle = "int1000"
    digits: int = 3

    def __post_init__(self) -> None:
        if self.style not in ("int1000", "fraction"):
            raise ValueError(f"box style must be 'int1000' or 'fraction', not {self.style!r}")

    def to_text(self, box: tuple[float, float, float, float], image_size: tuple[int, int]) -> str:
        """Pixel box (x0, y0, x1, y1) on an image of (width, height) -> ``<box>(..),(..)</box>``."""
        x0, y0, x1, y1 = normalised(box, image_size)
        if self.style == "int1000":
            vals = [min(999, int(v * 1000)) for v in (x0, y0, x1, y1)]
            a, b, c, d = (str(v) for v in vals)
        else:
            a, b, c, d = (f"{v:.{self.digits}f}" for v in (x0, y0, x1, y1))
        return f"{BOX_OPEN}({a},{b}),({c},{d}){BOX_CLOSE}"

    def parse(self, text: str, image_size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The first box in ``text`` as a pixel box, or None when there is none (a wrong answer, not an error)."""
        at = text.find(BOX_OPEN)
        m = _PAIR.search(text, at if at >= 0 else 0)
        if m is None:
            return None
        vals = [float(v) for v in m.groups()]
        scale = 1000.0 if self.style == "int1000" else 1.0
        w, h = image_size
        x0, y0, x1, y1 = vals[0] / scale * w, vals[1] / scale * h, vals[2] / scale * w, vals[3] / scale * h
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def normalised(box: tuple[float, float, float, float], image_size: tuple[int, int]) -> tuple[float, ...]:
    """A pixel box as fractions of the image's width and height."""
    w, h = image_size
    return (box[0] / w, box[1] / h, box[2] / w, box[3] / h)


def check_box(box: object, image_size: tuple[int, int], *, source: str | None = None,
              sample_id: str | None = None) -> tuple[float, float, float, float]:
    """A pixel box given as data, checked: four numbers, x0 <= x1, y0 <= y1, inside the image."""
    def fail(why: str) -> DataError:
        return DataError(f"box {box!r}: {why}", source=source, sample_id=sample_id)

    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise fail("a box is [x0, y0, x1, y1], four numbers in pixels")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise fail("x1 < x0 or y1 < y0: the corners are top-left then bottom-right")
    w, h = image_size
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise fail(f"outside the {w} x {h} image")
    return (x0, y0, x1, y1)


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1); 0 when either is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
