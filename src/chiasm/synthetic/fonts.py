"""A font that ships with the set-up, for worlds that render readable text.

DejaVu Sans comes with matplotlib (a chiasm dependency, for the report's plots) and with
Debian's fonts-dejavu-core; Pillow's scalable default font is the last resort, so text
always renders, the same way on every machine that has the same Pillow.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

_SYSTEM = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``size`` pixels (matplotlib's copy, else the system's, else Pillow's default)."""
    try:
        import matplotlib

        bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except ImportError:
        bundled = _SYSTEM
    for path in (bundled, _SYSTEM):
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)
