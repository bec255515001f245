"""Fixed 2D sine-cosine position embeddings for tokens laid out on a grid (MAE / Qwen-VL style)."""

from __future__ import annotations

import math

import torch


def _rows_then_columns(row_phase: torch.Tensor, col_phase: torch.Tensor) -> torch.Tensor:
    """``(h, n)`` and ``(w, n)`` phases -> ``(h*w, 4n)``: [sin row, cos row, sin col, cos col]."""
    h, w, n = row_phase.shape[0], col_phase.shape[0], row_phase.shape[1]
    r = torch.cat([row_phase.sin(), row_phase.cos()], dim=-1)[:, None, :].expand(h, w, 2 * n)
    c = torch.cat([col_phase.sin(), col_phase.cos()], dim=-1)[None, :, :].expand(h, w, 2 * n)
    return torch.cat([r, c], dim=-1).reshape(h * w, 4 * n)


def _check_width(dim: int) -> int:
    if dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, got {dim}")
    return dim // 4


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """``(h*w, dim)`` embedding of integer (row, column): half the channels for each.

    Frequencies follow the transformer recipe (1 / 10000^(k/n)), so any width works
    without the overflow that powers of two would hit at large ``dim``. Used where
    queries and keys are compared (resamplers), which wants many distinct frequencies.
    """
    n = _check_width(dim)
    omega = 1.0 / (10000 ** (torch.arange(n, dtype=torch.float32) / n))
    h, w = grid
    return _rows_then_columns(torch.arange(h, dtype=torch.float32)[:, None] * omega,
                              torch.arange(w, dtype=torch.float32)[:, None] * omega)


def fractional_sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """``(h*w, dim)`` code of each cell centre's *fractional* (row, column) in [0, 1].

    The same place in the image gets the same code at any grid size, which is what a
    per-token feature code needs (the MLP's ``pos_dim``). Octave frequencies (pi/2 * 2^k)
    make the lowest one monotone over the image, so "top" vs "bottom" is a single sign.
    Meant for small widths: ``dim / 4`` octaves.
    """
    n = _check_width(dim)
    freqs = torch.pi * (2.0 ** torch.arange(n, dtype=torch.float32)) / 2
    h, w = grid
    rows = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    cols = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    return _rows_then_columns(rows[:, None] * freqs, cols[:, None] * freqs)


def square_side(n_tokens: int, who: str) -> int:
    """Side of the square query grid that carries ``n_tokens`` 2D positions."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{who}: num_queries must be a perfect square (got {n_tokens}) to lay queries on a grid")
    return side
