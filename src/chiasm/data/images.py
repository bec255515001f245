"""Image loading that fails loudly and names the culprit.

A training run that dies deep inside a collator with ``OSError: image file is
truncated`` says nothing about which of a million files is broken. Every image in
chiasm goes through :func:`load_image`, which turns any decoding problem into a
:class:`DataError` naming the image path, the sample and the data file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from chiasm.data.sample import DataError


def load_image(path: Path, *, sample_id: str | None = None, source: str | None = None) -> Image.Image:
    """Open ``path`` and return a fully decoded RGB image.

    The file is first verified (cheap structural check, catches truncation in
    formats PIL can verify) and then reopened and decoded in full, because a
    verified image cannot be used and some corruption only shows on decode.
    Converting to RGB here means the encoders never see palette, grey or RGBA
    images and all share one preprocessing path.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}", source=source, sample_id=sample_id)
    try:
        with Image.open(path) as probe:
            probe.verify()
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # PIL signals corruption with several exception types depending on the
        # format plugin (SyntaxError for some broken PNG chunks, for instance).
        raise DataError(f"cannot decode image {path}: {exc}", source=source, sample_id=sample_id) from exc
