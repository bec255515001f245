"""How one image's visual tokens are laid out in the LM's sequence: the image-layout seam.

A layout decides two things that must agree: the order in which the bridge's tokens are
spliced into the sequence (:meth:`ImageLayout.token_order`) and the text an image
placeholder becomes before tokenisation (:meth:`ImageLayout.image_text`), which may put
words between groups of tokens, as SmolVLM/Idefics3 (``<row_1_col_2>``) and MiniCPM-V
mark where each tile of an image sits.

``raster`` (the default, registered here) puts the bridge's tokens in its own order, row
by row, with nothing between them. Other layouts are looked up by exact name in
:data:`LAYOUTS`; the synthetic world's ``quadrants`` layout lives with that world
(``chiasm.synthetic.layout``) and is imported only when a config names it.
"""

from __future__ import annotations

from chiasm.registry import Registry
from chiasm.tokens import IMAGE_TOKEN


class ImageLayout:
    """One way of placing an image's visual tokens; subclasses that name groups override ``token_groups``."""

    name = ""

    def check(self, token_grid: tuple[int, int] | None, n_tokens: int) -> None:
        """Refuse, with the reason, a bridge whose tokens this layout cannot follow."""

    def token_groups(self, token_grid: tuple[int, int] | None, n_tokens: int) -> list[tuple[str, list[int]]]:
        """The named groups, in sequence order: (name, indices into the bridge's row-major tokens).

        A layout without named groups returns ``[]`` and keeps the bridge's order.
        """
        self.check(token_grid, n_tokens)
        return []

    def group_at(self, x: float, y: float) -> int:
        """Index of the named group that holds the image point ``(x, y)`` (fractions, origin top left)."""
        raise ValueError(f"image layout {self.name!r} has no named groups")

    def token_order(self, token_grid: tuple[int, int] | None, n_tokens: int) -> list[int] | None:
        """Indices into the bridge's row-major tokens in sequence order; None keeps them as they are."""
        groups = self.token_groups(token_grid, n_tokens)
        return [i for _, members in groups for i in members] if groups else None

    def image_text(self, n_tokens: int) -> str:
        """The text of one image placeholder. It holds exactly ``n_tokens`` image tokens whatever
        the layout, so the count checks of the data pipeline and the model stay the same."""
        return IMAGE_TOKEN * n_tokens


LAYOUTS: Registry[ImageLayout] = Registry("image layout", plugins={"quadrants": "chiasm.synthetic.layout"})


@LAYOUTS.register("raster")
class RasterLayout(ImageLayout):
    """The bridge's tokens in its own order with nothing between them: the LM learns from sequence
    positions alone which token lies where."""

    name = "raster"


def get_layout(name: str) -> ImageLayout:
    """The layout registered under exactly ``name``; a ValueError listing the known ones otherwise."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown image layout {name!r}; known: {', '.join(LAYOUTS.names())}")
    return LAYOUTS.get(name)()


def check_layout(layout: str, token_grid: tuple[int, int] | None, n_tokens: int) -> None:
    """Refuse an unknown layout or one that the bridge's tokens cannot follow, with the reason."""
    get_layout(layout).check(token_grid, n_tokens)


def token_order(layout: str, token_grid: tuple[int, int] | None, n_tokens: int) -> list[int] | None:
    """:meth:`ImageLayout.token_order` of the layout named ``layout``."""
    return get_layout(layout).token_order(token_grid, n_tokens)


def image_text(layout: str, n_tokens: int) -> str:
    """:meth:`ImageLayout.image_text` of the layout named ``layout``."""
    return get_layout(layout).image_text(n_tokens)
