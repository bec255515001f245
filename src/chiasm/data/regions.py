"""Grounded phrases: a phrase and the box of the image it names.

A sample may carry ``"regions": [{"phrase": "small red circle", "box": [x0, y0, x1, y1]}, ...]``
with the box in ``[0, 1]`` image coordinates (origin top left), as grounded caption data
(Flickr30k Entities, RefCOCO, GRIT) annotate. Region-level objectives pair each phrase with
the visual tokens that cover its box; :func:`box_token_mask` is that mapping for a bridge
whose tokens lie on a grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chiasm.data.sample import DataError, Sample


@dataclass(frozen=True)
class Region:
    """One phrase and its box, ``(x0, y0, x1, y1)`` as fractions of the image's width and height."""

    phrase: str
    box: tuple[float, float, float, float]


def sample_regions(sample: Sample) -> list[Region]:
    """The sample's ``regions``, validated; a clear :class:`DataError` naming it otherwise."""
    raw = sample.meta.get("regions")

    def fail(why: str) -> DataError:
        return DataError(f"regions: {why}", source=sample.source, sample_id=sample.id)

    if raw is None:
        raise fail('none given (a region-level objective needs "regions": [{"phrase": ..., "box": ...}])')
    if not isinstance(raw, list) or not raw:
        raise fail("must be a non-empty list")
    regions = []
    for k, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"phrase", "box"}:
            raise fail(f"item {k} must be an object with exactly the keys 'phrase' and 'box'")
        phrase, box = item["phrase"], item["box"]
        if not isinstance(phrase, str) or not phrase.strip():
            raise fail(f"item {k}: phrase must be non-empty text")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in box)):
            raise fail(f"item {k}: box must be 4 numbers [x0, y0, x1, y1]")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise fail(f"item {k}: box {box} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        regions.append(Region(phrase.strip(), (x0, y0, x1, y1)))
    return regions


def box_token_mask(box: tuple[float, float, float, float], grid: tuple[int, int]) -> torch.Tensor:
    """``(rows * cols,)`` bool, row-major: the grid cells that overlap the box with positive area."""
    rows, cols = grid
    x0, y0, x1, y1 = box
    ys = torch.arange(rows, dtype=torch.float64)
    xs = torch.arange(cols, dtype=torch.float64)
    row_hit = (ys + 1) / rows > y0
    row_hit &= ys / rows < y1
    col_hit = (xs + 1) / cols > x0
    col_hit &= xs / cols < x1
    return (row_hit[:, None] & col_hit[None, :]).flatten()
