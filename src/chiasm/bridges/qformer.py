"""BLIP-2's Q-Former: learned queries through a small BERT-style stack.

Queries self-attend in every layer and cross-attend to the (layer-normed) image features
every ``cross_every`` layers; post-norm residuals and GELU feed-forward blocks as in BERT.
A final linear map takes the query outputs to the LM's width: M tokens per image.
"""

from __future__ import annotations

import torch
from torch import nn

from chiasm.bridges.base import BRIDGES, Bridge


class _QFormerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, vision_dim: int, cross: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln_self = nn.LayerNorm(hidden)
        self.cross = (nn.MultiheadAttention(hidden, heads, kdim=vision_dim, vdim=vision_dim, batch_first=True)
                      if cross else None)
        self.ln_cross = nn.LayerNorm(hidden) if cross else None
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.ln_ff = nn.LayerNorm(hidden)

    def forward(self, q: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        q = self.ln_self(q + self.self_attn(q, q, q, need_weights=False)[0])
        if self.cross is not None:
            q = self.ln_cross(q + self.cross(q, feats, feats, need_weights=False)[0])
        return self.ln_ff(q + self.ff(q))


@BRIDGES.register("qformer")
class QFormer(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 32, depth: int = 4, hidden: int = 256,
                 heads: int = 4, cross_every: int = 2):
        super().__init__(vision_dim, lm_dim)
        if hidden % heads:
            raise ValueError(f"qformer: hidden {hidden} is not divisible by heads {heads}")
        self.num_queries = num_queries
        self.ln_vision = nn.LayerNorm(vision_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * 0.02)
        self.layers = nn.ModuleList(_QFormerLayer(hidden, heads, vision_dim, cross=i % cross_every == 0)
                                    for i in range(depth))
        self.proj = nn.Linear(hidden, lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        feats = self.ln_vision(features)
        q = self.queries.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, feats)
        return self.proj(q)
