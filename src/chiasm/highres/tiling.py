"""Dynamic high resolution: one image -> a global view plus a grid of tiles at the encoder's size.

A square encoder input of a few hundred pixels loses small text and icons. LLaVA-NeXT
("anyres") and InternVL instead cut the original into tiles at the encoder's resolution,
choosing the grid from a configured set so that it fits the image's shape, and add a
thumbnail of the whole image (the global view). Both choices are here, by name:

- ``aspect`` (InternVL's ``dynamic_preprocess``): every grid with ``min_tiles`` <= rows x
  cols <= ``max_tiles`` is a candidate; the one whose aspect ratio is closest to the image's
  wins, a tie going to the larger grid when the image has more than half its pixels. The
  image is resized to the grid (no padding).
- ``anyres`` (LLaVA-NeXT's ``select_best_resolution``): the grids are listed (``pinpoints``,
  as [rows, cols]); the one that keeps the most of the image's pixels at its scale, then
  wastes the least canvas, wins. The image is resized keeping its aspect ratio and padded.

A grid of one tile adds nothing to the global view, so such an image is the global view
alone. Every view is then preprocessed by the encoder's own preprocessing, and all views of
a batch go through the encoder as one batch. Where each view sits is told to the LM by text
between the views' image tokens (:func:`image_text`): Idefics3's ``<row_r_col_c>`` markers
and a newline at each row end, only the newline, or nothing. The number of image-token
positions of an image follows from its size alone (:func:`chiasm.tokens.image_token_count`),
so data, model and generation agree before any pixel is decoded.
"""

from __future__ import annotations

from PIL import Image

from chiasm.config import TilingConfig

__all__ = ["TilingConfig", "TilingError", "choose_grid", "image_text", "n_views", "views"]
GLOBAL_MARKER = "<global-img>"


class TilingError(ValueError):
    """An image that no configured grid can take (too small, too large, too elongated)."""


def closest_aspect_grid(width: int, height: int, grids: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """InternVL's ``find_closest_aspect_ratio``: the grid (rows, cols) whose cols/rows is nearest w/h."""
    aspect = width / height
    best, best_diff = grids[0], float("inf")
    area = width * height
    for rows, cols in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (rows, cols), diff
        elif diff == best_diff and area > 0.5 * tile * tile * rows * cols:
            best = (rows, cols)
    return best


def best_resolution_grid(width: int, height: int, grids: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """LLaVA-NeXT's ``select_best_resolution`` over grids: most kept pixels, then least wasted canvas."""
    best, best_kept, best_waste = grids[0], -1, float("inf")
    for rows, cols in grids:
        cw, ch = cols * tile, rows * tile
        scale = min(cw / width, ch / height)
        dw, dh = int(width * scale), int(height * scale)
        kept = min(dw * dh, width * height)
        waste = cw * ch - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (rows, cols), kept, waste
    return best


def choose_grid(size: tuple[int, int], cfg: TilingConfig, tile: int) -> tuple[int, int]:
    """The (rows, cols) grid for an image of ``size`` = (width, height); TilingError if none fits."""
    width, height = size
    if min(width, height) < cfg.min_side:
        raise TilingError(f"image of {width} x {height} pixels is too small for any grid (a side below "
                          f"tiling.min_side = {cfg.min_side})")
    if width * height > cfg.max_image_pixels:
        raise TilingError(f"image of {width} x {height} pixels is too large for any grid (over "
                          f"tiling.max_image_pixels = {cfg.max_image_pixels})")
    grids = cfg.grids()
    pick = closest_aspect_grid if cfg.mode == "aspect" else best_resolution_grid
    rows, cols = pick(width, height, grids, tile)
    ratio = (width / height) / (cols / rows)
    if max(ratio, 1 / ratio) > cfg.max_distortion:
        raise TilingError(f"image of {width} x {height} pixels is too elongated for any grid: the best, "
                          f"{rows} x {cols} tiles, distorts it {max(ratio, 1 / ratio):.1f}x (over "
                          f"tiling.max_distortion = {cfg.max_distortion})")
    return rows, cols


def n_views(size: tuple[int, int], cfg: TilingConfig, tile: int) -> int:
    """How many encoder inputs the image becomes: the global view and, for a grid over one tile, its tiles."""
    rows, cols = choose_grid(size, cfg, tile)
    if rows * cols == 1:
        return 1
    return rows * cols + int(cfg.global_view)


def views(image: Image.Image, cfg: TilingConfig, tile: int) -> list[Image.Image]:
    """The image's views in sequence order: the global view first (if any), then tiles row by row."""
    image = image.convert("RGB")
    rows, cols = choose_grid(image.size, cfg, tile)
    thumb = image.resize((tile, tile), Image.Resampling.BICUBIC)
    if rows * cols == 1:
        return [thumb]
    cw, ch = cols * tile, rows * tile
    if cfg.mode == "aspect":
        canvas = image.resize((cw, ch), Image.Resampling.BICUBIC)
    else:  # anyres: keep the aspect ratio, pad the rest (LLaVA-NeXT's resize_and_pad_image)
        scale = min(cw / image.width, ch / image.height)
        nw, nh = min(cw, max(1, round(image.width * scale))), min(ch, max(1, round(image.height * scale)))
        canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
        canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((cw - nw) // 2, (ch - nh) // 2))
    tiles = [canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(rows) for c in range(cols)]
    return ([thumb] if cfg.global_view else []) + tiles


def image_text(size: tuple[int, int], cfg: TilingConfig, tile: int, view_text: str) -> str:
    """The text one placeholder becomes: each view's ``view_text`` (its image tokens) with separators."""
    rows, cols = choose_grid(size, cfg, tile)
    if rows * cols == 1:
        return view_text
    parts = []
    if cfg.global_view:
        parts.append((GLOBAL_MARKER if cfg.separators == "markers" else "") + view_text
                     + ("\n" if cfg.separators != "none" else ""))
    for r in range(rows):
        for c in range(cols):
            marker = f"<row_{r + 1}_col_{c + 1}>" if cfg.separators == "markers" else ""
            parts.append(marker + view_text)
        if cfg.separators != "none":
            parts.append("\n")
    return "".join(parts)
