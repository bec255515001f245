"""A pixel-level checker for text-to-image on the synthetic world: did it draw what the prompt said?

The world knows each object's colour, cell and shape, so a generated image can be scored
exactly: the object's pixels are those nearest one of the world's six colours (and far from
the white background); the colour is the one with most pixels, the cell is where their
centre of mass falls, and the shape is read from how much of its bounding box it fills (a
square fills all of it, a circle pi/4, a triangle half).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chiasm.synthetic.world import CELLS, COLOURS

PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
NAMES = list(COLOURS)
MIN_PIXELS = 4  # fewer object pixels than this: nothing was drawn
MAX_DISTANCE = 90.0  # RGB distance within which a pixel counts as that palette colour


@dataclass(frozen=True)
class Reading:
    """What the checker sees in one image."""

    colour: str | None
    cell: str | None
    shape: str | None
    fill: float


def read_image(x: torch.Tensor) -> Reading:
    """One RGB image (3, H, W) in [-1, 1]."""
    rgb = ((x.detach().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).double().numpy()
    h, w, _ = rgb.shape
    dist = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, 6)
    nearest, d = dist.argmin(-1), dist.min(-1)
    background = np.linalg.norm(rgb - 255.0, axis=-1)
    mask_any = (d < MAX_DISTANCE) & (d < background)
    if mask_any.sum() < MIN_PIXELS:
        return Reading(None, None, None, 0.0)
    counts = np.bincount(nearest[mask_any], minlength=len(NAMES))
    colour = int(counts.argmax())
    mask = mask_any & (nearest == colour)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    cell = CELLS[(2 if cy >= h / 2 else 0) + (1 if cx >= w / 2 else 0)]
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return Reading(NAMES[colour], cell, shape, fill)


def check(images: torch.Tensor, scenes: list[dict]) -> dict[str, float]:
    """Shares of images whose colour, cell, colour-and-cell and shape match the asked scene."""
    hits = {"colour": 0, "cell": 0, "colour_and_cell": 0, "shape": 0}
    for x, want in zip(images, scenes, strict=True):
        r = read_image(x)
        hits["colour"] += r.colour == want["colour"]
        hits["cell"] += r.cell == want["cell"]
        hits["colour_and_cell"] += r.colour == want["colour"] and r.cell == want["cell"]
        hits["shape"] += r.shape == want["shape"]
    return {k: v / max(1, len(scenes)) for k, v in hits.items()}
