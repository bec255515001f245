"""Fixed 2D sine-cosine position embeddings for tokens laid out on a grid (MAE / Qwen-VL style)."""

from __future__ import annotations

import math

import torch


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """``(h*w, dim)`` embedding: half the channels encode the row, half the column.

    Frequencies follow the transformer recipe (1 / 10000^(k/n)), so any width works
    without the overflow that powers of two would hit at large ``dim``.
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    n = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(n, dtype=torch.float32) / n))
    rows = torch.arange(h, dtype=torch.float32)[:, None] * omega  # (h, n)
    cols = torch.arange(w, dtype=torch.float32)[:, None] * omega  # (w, n)
    r = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None, :].expand(h, w, 2 * n)
    c = torch.cat([cols.sin(), cols.cos()], dim=-1)[None, :, :].expand(h, w, 2 * n)
    return torch.cat([r, c], dim=-1).reshape(h * w, dim)


def square_side(n_tokens: int, who: str) -> int:
    """Side of the square query grid that carries ``n_tokens`` 2D positions."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{who}: num_queries must be a perfect square (got {n_tokens}) to lay queries on a grid")
    return side
