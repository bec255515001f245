"""Bridges that emit fewer tokens by merging neighbouring grid cells.

* ``pixel_shuffle`` (Idefics3 / nanoVLM): space-to-depth by ``factor`` s, then a linear
  map: s*s neighbouring features become one token of width s*s*Dv -> h*w/s^2 tokens.
* ``pooling`` (LLaVA-NeXT style): k x k average pooling of the grid, then the MLP. A
  rectangular ``kernel = [kh, kw]`` pools a one-row grid along its length: an audio
  encoder's frames, ``[1, 8]`` averaging 8 consecutive 20 ms frames into one token.
"""

from __future__ import annotations

import torch
from torch import nn

from chiasm.bridges.base import BRIDGES, Bridge
from chiasm.bridges.projectors import MLPBridge


def _to_map(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, h*w, D)`` -> ``(B, D, h, w)``."""
    h, w = grid
    return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], h, w)


def _check_divisible(grid: tuple[int, int], factor: int, name: str) -> None:
    if grid[0] % factor or grid[1] % factor:
        raise ValueError(f"{name}: the {grid[0]}x{grid[1]} feature grid is not divisible by factor {factor}")


@BRIDGES.register("pixel_shuffle")
class PixelShuffleBridge(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, factor: int = 2):
        super().__init__(vision_dim, lm_dim)
        self.factor = factor
        self.proj = nn.Linear(vision_dim * factor * factor, lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        _check_divisible(grid, self.factor, "pixel_shuffle")
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return grid[0] // self.factor, grid[1] // self.factor

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        _check_divisible(grid, self.factor, "pixel_shuffle")
        folded = nn.functional.pixel_unshuffle(_to_map(features, grid), self.factor)  # (B, D*s*s, h/s, w/s)
        return self.proj(folded.flatten(2).transpose(1, 2))


@BRIDGES.register("pooling")
class PoolingBridge(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, kernel: int | list[int] = 2, hidden: int | None = None):
        super().__init__(vision_dim, lm_dim)
        pair = [kernel, kernel] if isinstance(kernel, int) else list(kernel)
        if len(pair) != 2 or min(pair) < 1:
            raise ValueError(f"pooling: kernel is k or [kh, kw] of positive sizes, not {kernel!r}")
        self.kernel = (int(pair[0]), int(pair[1]))
        self.mlp = MLPBridge(vision_dim, lm_dim, hidden=hidden)

    def _check(self, grid: tuple[int, int]) -> tuple[int, int]:
        (h, w), (kh, kw) = grid, self.kernel
        if h % kh or w % kw:
            raise ValueError(f"pooling: the {h}x{w} feature grid is not divisible by the {kh}x{kw} kernel")
        return h // kh, w // kw

    def num_tokens(self, grid: tuple[int, int]) -> int:
        rows, cols = self._check(grid)
        return rows * cols

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return self._check(grid)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        small = self._check(grid)
        pooled = nn.functional.avg_pool2d(_to_map(features, grid), self.kernel)
        return self.mlp(pooled.flatten(2).transpose(1, 2), small)
