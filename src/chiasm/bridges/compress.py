"""Bridges that emit fewer tokens by merging neighbouring grid cells.

* ``pixel_shuffle`` (Idefics3 / nanoVLM): space-to-depth by ``factor`` s, then a linear
  map: s*s neighbouring features become one token of width s*s*Dv -> h*w/s^2 tokens. A
  rectangular ``factor = [1, k]`` stacks k consecutive frames of a one-row grid (the frame
  stacking of speech LLMs).
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


@BRIDGES.register("pixel_shuffle")
class PixelShuffleBridge(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, factor: int | list[int] = 2):
        super().__init__(vision_dim, lm_dim)
        self.factor = _pair(factor, "pixel_shuffle: factor")
        self.proj = nn.Linear(vision_dim * self.factor[0] * self.factor[1], lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        rows, cols = _blocks(grid, self.factor, "pixel_shuffle")
        return rows * cols

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return _blocks(grid, self.factor, "pixel_shuffle")

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Space-to-depth: each block's features side by side, channel-major as ``pixel_unshuffle`` orders them."""
        (rows, cols), (kh, kw) = _blocks(grid, self.factor, "pixel_shuffle"), self.factor
        b, d = features.shape[0], features.shape[2]
        blocks = features.reshape(b, rows, kh, cols, kw, d).permute(0, 1, 3, 5, 2, 4)  # (B, rows, cols, D, kh, kw)
        return self.proj(blocks.reshape(b, rows * cols, d * kh * kw))


def _pair(value: int | list[int], what: str) -> tuple[int, int]:
    """``k`` or ``[kh, kw]`` as a pair of positive sizes (a rectangle folds a one-row grid along its length)."""
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{what} is k or [kh, kw] of positive sizes, not {value!r}")
    return int(pair[0]), int(pair[1])


def _blocks(grid: tuple[int, int], size: tuple[int, int], name: str, unit: str = "factor") -> tuple[int, int]:
    """The (rows, cols) of ``size`` blocks over ``grid``; a grid they do not tile is refused."""
    (h, w), (kh, kw) = grid, size
    if h % kh or w % kw:
        what = f"factor {kh}" if kh == kw else f"the {kh}x{kw} {unit}"
        raise ValueError(f"{name}: the {h}x{w} feature grid is not divisible by {what}")
    return h // kh, w // kw


@BRIDGES.register("pooling")
class PoolingBridge(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, kernel: int | list[int] = 2, hidden: int | None = None):
        super().__init__(vision_dim, lm_dim)
        self.kernel = _pair(kernel, "pooling: kernel")
        self.mlp = MLPBridge(vision_dim, lm_dim, hidden=hidden)

    def _check(self, grid: tuple[int, int]) -> tuple[int, int]:
        return _blocks(grid, self.kernel, "pooling", "kernel")

    def num_tokens(self, grid: tuple[int, int]) -> int:
        rows, cols = self._check(grid)
        return rows * cols

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return self._check(grid)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        small = self._check(grid)
        pooled = nn.functional.avg_pool2d(_to_map(features, grid), self.kernel)
        return self.mlp(pooled.flatten(2).transpose(1, 2), small)
