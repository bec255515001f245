"""Image loading that fails loudly, names the culprit, and gets every pixel format right.

A training run that dies deep inside a collator with ``OSError: image file is
truncated`` says nothing about which of a million files is broken. Every image in
chiasm goes through :func:`load_image`, which turns any problem (missing, empty,
unreadable, not an image, truncated, a decompression bomb) into a
:class:`DataError` naming the image path, the sample and the data file.

A plain ``image.convert("RGB")`` is wrong for several modes real datasets hold: it
clips 16-bit grey to white, drops alpha onto black, and ignores the EXIF
orientation phones write instead of rotating pixels. :func:`to_rgb` handles each mode:

* 16-bit grey (``I;16*``) is scaled by 255/65535; ``I`` (32-bit int) the same when its
  values fit 16 bits, else by its own range. 16-bit RGB(A) PNGs are already reduced to
  8 bits by Pillow's decoder (high byte).
* ``F`` (float) images: values in [0, 1] are scaled by 255, values in [0, 255] kept,
  anything else stretched over its range; NaN or infinity is refused.
* Transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a transparent
  colour) is composited over :data:`ALPHA_BACKGROUND`, white: transparent images in
  the wild are mostly logos, icons, diagrams and text drawn for a white page, where a
  black background would make dark strokes vanish.
* ``CMYK`` (Pillow reads JPEG CMYK with Adobe's inverted convention), ``1``, ``L``,
  ``P``, ``YCbCr`` and ``HSV`` use Pillow's own conversion.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from chiasm.data.sample import DataError

ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(path: str | Path, *, sample_id: str | None = None, source: str | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Open ``path`` and return a fully decoded, upright RGB image, or raise :class:`DataError`.

    ``max_pixels`` caps width x height (default: Pillow's ``Image.MAX_IMAGE_PIXELS``),
    checked from the header before any pixel is decoded, so a decompression bomb is
    refused without the memory it would take. Pillow's own check still runs when the file is
    opened, so ``max_pixels`` can lower the limit but not raise it above Pillow's (that is the
    process-wide ``PIL.Image.MAX_IMAGE_PIXELS``). The file is verified (a cheap structural
    check that catches bad PNG chunks and CRCs) and then decoded in full, because a
    verified image cannot be used and some corruption only shows on decode.
    """
    path = Path(path)

    def fail(message: str) -> DataError:
        return DataError(message, source=source, sample_id=sample_id, image=str(path))

    if not path.exists():
        raise fail(f"image not found: {path}")
    if path.is_dir():
        raise fail(f"image path is a directory, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise fail(f"cannot read image {path}: permission denied")
    if path.stat().st_size == 0:
        raise fail(f"image file is empty (0 bytes): {path}")
    try:
        return _decode(lambda: Image.open(path), str(path), max_pixels, fail)
    except DataError as exc:
        if exc.sample_id is None and exc.source is None and (sample_id or source):
            raise fail(str(exc)) from exc
        raise
    except PermissionError as exc:
        raise fail(f"cannot read image {path}: permission denied") from exc


def decode_image(data: bytes, *, describe: str = "image", max_pixels: int | None = None) -> Image.Image:
    """:func:`load_image` for bytes already in memory (an upload): the same checks, the same RGB rules.

    ``describe`` names the image in errors (e.g. "message 2, image 1"), as the path does for a file.
    """
    if not data:
        raise DataError(f"{describe} is empty (0 bytes)", image=describe)

    def fail(message: str) -> DataError:
        return DataError(message, image=describe)

    return _decode(lambda: Image.open(io.BytesIO(data)), describe, max_pixels, fail)


def _decode(open_image: Callable[[], Image.Image], describe: str, max_pixels: int | None,
            fail: Callable[[str], DataError]) -> Image.Image:
    """Size check from the header (before any pixel is decoded), structural verify, full decode, RGB."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refusals here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image() as probe:
                width, height = probe.size
                if limit is not None and width * height > limit:
                    raise fail(f"image {describe} has {width}x{height} = {width * height} pixels, over the limit "
                               f"of {limit} (a decompression bomb or a huge scan)")
                probe.verify()
            with open_image() as image:
                image.load()
                return to_rgb(image, describe=describe)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise fail(f"image {describe} refused as a decompression bomb: {exc}") from exc
    except (PermissionError, DataError):
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL signals corruption with several exception types depending on the
        # format plugin (SyntaxError for some broken PNG chunks, for instance).
        raise fail(f"cannot decode image {describe}: {exc}") from exc


def to_rgb(image: Image.Image, *, describe: str = "image") -> Image.Image:
    """A decoded PIL image of any mode -> an upright 8-bit RGB image (rules in the module docstring)."""
    try:
        image = ImageOps.exif_transpose(image)
    except (struct.error, KeyError, TypeError, ValueError, SyntaxError, OSError):
        pass  # a malformed EXIF block leaves the pixels as stored, as viewers do; they are intact
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image  # exif_transpose returned a copy, already decoded
    if mode in _SIXTEEN_BIT:
        grey = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        return _grey(grey)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _grey(values * (255.0 / 65535.0))
        return _grey(_stretch(values))
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise DataError(f"float image {describe} holds NaN or infinite values")
        if values.size and values.min() >= 0 and values.max() <= 1:
            return _grey(values * 255.0)
        if values.size and values.min() >= 0 and values.max() <= 255:
            return _grey(values)
        return _grey(_stretch(values))
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise DataError(f"image {describe} has mode {mode!r}, which cannot be converted to RGB: {exc}") from exc


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map the image's own [min, max] onto [0, 255] (a constant image becomes black)."""
    low, high = float(values.min()), float(values.max())
    return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)


def _grey(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def image_size(path: str | Path, *, sample_id: str | None = None, source: str | None = None) -> tuple[int, int]:
    """(width, height) of the image :func:`load_image` returns, from the header alone (no decoding).

    A tiled image's token count follows from its size, so the size is read before any pixel:
    the EXIF orientation that :func:`load_image` applies swaps the sides for rotations by 90 degrees.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found", source=source, sample_id=sample_id, image=str(path)) from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read the image's size: {exc}", source=source, sample_id=sample_id,
                        image=str(path)) from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
