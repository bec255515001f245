"""Where a cell of the encoder's input lies in the original image, and grids mapped onto grids.

The encoder never sees the uploaded image itself: the preprocessing pads it to a square,
resizes it and may cut out its centre (``chiasm.encoders.preprocessing``). A patch of the
encoder's input therefore covers a region of the original image that only the inverse of those
steps can tell; drawing the grid evenly over the uploaded picture would put every cell in the
wrong place as soon as the image is not square. :func:`cell_boxes` applies that inverse.

:func:`resample_grid` moves values from one grid over the encoder's input onto another (the
bridge's token grid onto the encoder's grid): a token that covers several cells shares its
value between them by area, so the total is kept whatever the two grids are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chiasm.encoders.preprocessing import ImagePreprocessing

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, origin top left


@dataclass(frozen=True)
class Geometry:
    """The forward steps of one preprocessing for one image size, enough to invert them.

    The encoder's input pixel ``(x, y)`` comes from the original image's
    ``((x + left) * scale_x - pad_x, (y + top) * scale_y - pad_y)``.
    """

    image_size: tuple[int, int]  # (width, height) of the original image
    input_size: tuple[int, int]  # (width, height) of the encoder's input
    pad: tuple[int, int]
    scale: tuple[float, float]
    crop_offset: tuple[int, int]

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        """An encoder-input point -> the original image's point (may lie in the padding, outside it)."""
        return ((x + self.crop_offset[0]) * self.scale[0] - self.pad[0],
                (y + self.crop_offset[1]) * self.scale[1] - self.pad[1])


def geometry(pre: ImagePreprocessing, width: int, height: int) -> Geometry:
    """The steps ``pre`` takes on a ``width`` x ``height`` image (the same arithmetic as its ``__call__``)."""
    pad_x = pad_y = 0
    w, h = width, height
    if pre.pad_to_square and w != h:
        side = max(w, h)
        pad_x, pad_y = (side - w) // 2, (side - h) // 2
        w = h = side
    if pre.resize == "exact":
        new_w, new_h = pre.size[1], pre.size[0]
    elif pre.resize == "shortest_edge":
        edge, short, long = pre.size[0], min(w, h), max(w, h)
        new_short, new_long = edge, int(edge * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_w, new_h = w, h
    left = top = 0
    out_w, out_h = new_w, new_h
    if pre.crop is not None:
        out_h, out_w = pre.crop
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return Geometry((width, height), (out_w, out_h), (pad_x, pad_y), (w / new_w, h / new_h), (left, top))


def cell_boxes(geo: Geometry, grid: tuple[int, int]) -> list[dict]:
    """Every cell of a ``(rows, cols)`` grid laid evenly over the encoder's input, row-major.

    Each cell gets its box in the original image, clipped to the image, and the share of the
    cell's area that shows the image (0 for a cell that lies wholly in the padding).
    """
    rows, cols = grid
    in_w, in_h = geo.input_size
    img_w, img_h = geo.image_size
    cells = []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = geo.to_image(c * in_w / cols, r * in_h / rows)
            x1, y1 = geo.to_image((c + 1) * in_w / cols, (r + 1) * in_h / rows)
            cx0, cy0 = min(max(x0, 0.0), img_w), min(max(y0, 0.0), img_h)
            cx1, cy1 = min(max(x1, 0.0), img_w), min(max(y1, 0.0), img_h)
            full = (x1 - x0) * (y1 - y0)
            shown = (cx1 - cx0) * (cy1 - cy0)
            cells.append({"row": r, "col": c, "box": [round(v, 2) for v in (cx0, cy0, cx1, cy1)],
                          "visible": round(shown / full, 4) if full > 0 else 0.0})
    return cells


def overlap_matrix(n_from: int, n_to: int) -> np.ndarray:
    """``(n_from, n_to)``: the share of each of ``n_from`` equal intervals of [0, 1] that falls in each of ``n_to``."""
    edges_from = np.linspace(0.0, 1.0, n_from + 1)
    edges_to = np.linspace(0.0, 1.0, n_to + 1)
    lo = np.maximum(edges_from[:-1, None], edges_to[None, :-1])
    hi = np.minimum(edges_from[1:, None], edges_to[None, 1:])
    return np.clip(hi - lo, 0.0, None) * n_from


def resample_grid(values: np.ndarray, to: tuple[int, int]) -> np.ndarray:
    """A ``(rows, cols)`` array of values over the encoder's input -> the same mass on a ``to`` grid.

    Rows and columns are independent, so the area overlap of two cells is the product of
    their overlaps along each axis: ``R.T @ values @ C``.
    """
    rows, cols = values.shape
    return overlap_matrix(rows, to[0]).T @ values @ overlap_matrix(cols, to[1])
