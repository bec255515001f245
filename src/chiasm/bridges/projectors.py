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
    """

    def __init__(self, vision_dim: int, lm_dim: int, hidden: int | None = None, norm: bool = False,
                 pos_dim: int = 0):
        super().__init__(vision_dim, lm_dim)
        if pos_dim % 4:
            raise ValueError(f"pos_dim must be divisible by 4, got {pos_dim}")
        hidden = hidden or lm_dim
        self.pos_dim = pos_dim
        self.norm = nn.LayerNorm(vision_dim) if norm else nn.Identity()
        self.fc1 = nn.Linear(vision_dim + pos_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return grid

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.norm(features)
        if self.pos_dim:
            code = fractional_sincos_2d(grid, self.pos_dim).to(x.dtype).to(x.device)
            x = torch.cat([x, code.expand(x.shape[0], -1, -1)], dim=-1)
        return self.fc2(self.act(self.fc1(x)))
