"""The ``quadrants`` image layout: a gridded bridge's tokens grouped by quadrant and named in words.

Each group is named before and after its tokens::

    top left: <v><v><v><v> in the top left
    top right: <v><v><v><v> in the top right
    bottom left: <v><v><v><v> in the bottom left
    bottom right: <v><v><v><v> in the bottom right

Plain words suit a small LM better than new marker tokens: it can copy them. A language
model copies most easily what *follows* a match (the induction pattern), so each question
type of the synthetic world finds its answer after the thing it names: "What colour is the
object in the top left?" finds "top left:" and reads the tokens after it; "Where is the red
circle?" finds the red circle's tokens and copies "top left" after them. With the name
before the tokens only, wrong position answers tend to be the *next* quadrant's name (the
text that follows the object). The README's demo table records what each choice measured.
"""

from __future__ import annotations

from chiasm.layout import LAYOUTS, ImageLayout
from chiasm.tokens import IMAGE_TOKEN

QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")


@LAYOUTS.register("quadrants")
class QuadrantLayout(ImageLayout):
    """The four quadrants in reading order, each a row-major block of the bridge's token grid."""

    name = "quadrants"

    def check(self, token_grid: tuple[int, int] | None, n_tokens: int) -> None:
        if token_grid is None:
            raise ValueError("image layout 'quadrants' needs a bridge whose tokens form a grid (linear, mlp, "
                             "pooling, pixel_shuffle, c_abstractor); this bridge's tokens have no place in the image")
        h, w = token_grid
        if h % 2 or w % 2 or h * w != n_tokens:
            raise ValueError(f"image layout 'quadrants' needs an even token grid, got {h} x {w} "
                             f"({n_tokens} tokens); change the image size or the grid")

    def token_groups(self, token_grid: tuple[int, int] | None, n_tokens: int) -> list[tuple[str, list[int]]]:
        self.check(token_grid, n_tokens)
        assert token_grid is not None
        h, w = token_grid
        hh, hw = h // 2, w // 2
        groups = []
        for k, name in enumerate(QUADRANTS):
            qr, qc = divmod(k, 2)
            groups.append((name, [r * w + c for r in range(qr * hh, qr * hh + hh)
                                  for c in range(qc * hw, qc * hw + hw)]))
        return groups

    def group_at(self, x: float, y: float) -> int:
        return 2 * int(y >= 0.5) + int(x >= 0.5)

    def image_text(self, n_tokens: int) -> str:
        per = n_tokens // len(QUADRANTS)
        return "\n".join(f"{name}: {IMAGE_TOKEN * per} in the {name}" for name in QUADRANTS)
