"""LLaVA's linear projector and LLaVA-1.5's two-layer MLP: one LM token per grid cell."""

from __future__ import annotations

import torch
from torch import nn

from chiasm.bridges.base import BRIDGES, Bridge
from chiasm.bridges.positions import fractional_sincos_2d


@BRIDGES.register("linear")
class LinearBridge(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__(vision_dim, lm_dim)
        self.proj = nn.Linear(vision_dim, lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return grid

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.proj(features)


@BRIDGES.register("mlp")
class MLPBridge(Bridge):
    """Linear -> GELU -> Linear (LLaVA-1.5).

    ``norm`` adds a LayerNorm on the input features. ``pos_dim`` appends a fixed 2D
    sin-cos code of each token's grid cell to its features, so a token says *where* it is
    in its content, not only through its place in the sequence; questions about position
    then need only content lookup from the LM.

    ``upsample`` s makes each feature cell emit an s x s block of tokens (depth-to-space, the
    inverse of the pixel shuffle that merges tokens): the second layer writes s * s tokens,
    which the block lays out where the cell lies, so the tokens still form a grid. A coarse
    grid of whole-region features can then speak in several words per region: one feature
    that sees a whole object says its size, colour and shape on separate tokens, where a fine
    grid would leave each token only the part of the object it happens to cover.
    """

    def __init__(self, vision_dim: int, lm_dim: int, hidden: int | None = None, norm: bool = False,
                 pos_dim: int = 0, upsample: int = 1):
        super().__init__(vision_dim, lm_dim)
        if pos_dim % 4:
            raise ValueError(f"pos_dim must be divisible by 4, got {pos_dim}")
        if upsample < 1:
            raise ValueError(f"upsample must be at least 1, got {upsample}")
        hidden = hidden or lm_dim
        self.pos_dim = pos_dim
        self.upsample = upsample
        self.norm = nn.LayerNorm(vision_dim) if norm else nn.Identity()
        self.fc1 = nn.Linear(vision_dim + pos_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, lm_dim * upsample * upsample)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1] * self.upsample**2

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return grid[0] * self.upsample, grid[1] * self.upsample

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.norm(features)
        if self.pos_dim:
            code = fractional_sincos_2d(grid, self.pos_dim).to(x.dtype).to(x.device)
            x = torch.cat([x, code.expand(x.shape[0], -1, -1)], dim=-1)
        out = self.fc2(self.act(self.fc1(x)))
        s = self.upsample
        if s == 1:
            return out
        (h, w), b = grid, out.shape[0]
        # (B, h*w, s*s*D) -> (B, h, s, w, s, D): cell (r, c)'s sub-token (i, j) lands at (r*s + i, c*s + j).
        out = out.view(b, h, w, s, s, self.lm_dim).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h * s * w * s, self.lm_dim)
