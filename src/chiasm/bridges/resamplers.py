"""Bridges that emit a fixed number M of tokens whatever the encoder's resolution.

* ``c_abstractor`` (Honeybee): convolutional residual blocks, adaptive average pooling to
  a sqrt(M) x sqrt(M) grid, more blocks, an MLP readout; keeps local spatial structure.
* ``resampler`` (Qwen-VL): M learnable queries, one cross-attention layer over the
  features, with 2D sin-cos positions added to queries and keys.
* ``perceiver`` (Flamingo): latents through L layers that attend to [features; latents],
  each followed by a feed-forward block.
"""

from __future__ import annotations

import torch
from torch import nn

from chiasm.bridges.base import BRIDGES, Bridge
from chiasm.bridges.positions import sincos_2d, square_side


class _ResBlock(nn.Module):
    """conv3x3 -> norm -> SiLU -> conv3x3 -> norm, plus the input (a plain residual block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim), nn.SiLU(),
                                  nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


@BRIDGES.register("c_abstractor")
class CAbstractor(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 16, depth: int = 2,
                 hidden: int | None = None):
        super().__init__(vision_dim, lm_dim)
        self.num_queries = num_queries
        self.side = square_side(num_queries, "c_abstractor")
        hidden = hidden or lm_dim
        self.inp = nn.Conv2d(vision_dim, hidden, 1)
        self.before = nn.Sequential(*[_ResBlock(hidden) for _ in range(depth)])
        self.after = nn.Sequential(*[_ResBlock(hidden) for _ in range(depth)])
        self.readout = nn.Sequential(nn.Linear(hidden, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.num_queries

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return self.side, self.side

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, d = features.shape
        x = features.transpose(1, 2).reshape(b, d, *grid)
        x = self.before(self.inp(x))
        x = self.after(nn.functional.adaptive_avg_pool2d(x, self.side))
        return self.readout(x.flatten(2).transpose(1, 2))


@BRIDGES.register("resampler")
class CrossAttentionResampler(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 16, heads: int = 8):
        super().__init__(vision_dim, lm_dim)
        self.num_queries = num_queries
        self.side = square_side(num_queries, "resampler")
        self.queries = nn.Parameter(torch.randn(num_queries, lm_dim) * 0.02)
        self.kv_proj = nn.Linear(vision_dim, lm_dim, bias=False)
        self.ln_q = nn.LayerNorm(lm_dim)
        self.ln_kv = nn.LayerNorm(lm_dim)
        self.attn = nn.MultiheadAttention(lm_dim, heads, batch_first=True)
        self.ln_out = nn.LayerNorm(lm_dim)
        self.proj = nn.Linear(lm_dim, lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b = features.shape[0]
        kv = self.ln_kv(self.kv_proj(features))
        pos_k = sincos_2d(grid, kv.shape[-1]).to(kv)
        q = self.ln_q(self.queries)
        pos_q = sincos_2d((self.side, self.side), q.shape[-1]).to(q)
        out, _ = self.attn((q + pos_q).expand(b, -1, -1), kv + pos_k, kv, need_weights=False)
        return self.proj(self.ln_out(out))


class _PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_x = nn.LayerNorm(dim)
        self.ln_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        lat = self.ln_latents(latents)
        kv = torch.cat([self.ln_x(x), lat], dim=1)  # latents attend to the features and to themselves
        latents = latents + self.attn(lat, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


@BRIDGES.register("perceiver")
class PerceiverResampler(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 16, depth: int = 2, heads: int = 8):
        super().__init__(vision_dim, lm_dim)
        self.num_queries = num_queries
        self.inp = nn.Linear(vision_dim, lm_dim)
        self.latents = nn.Parameter(torch.randn(num_queries, lm_dim) * 0.02)
        self.layers = nn.ModuleList(_PerceiverLayer(lm_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.inp(features)
        latents = self.latents.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents)
