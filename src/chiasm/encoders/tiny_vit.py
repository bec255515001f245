"""A small ViT trained from scratch: fast, dependency-free, and used by the tests."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from chiasm.config import EncoderConfig
from chiasm.encoders.base import ENCODERS, VisionEncoder


@ENCODERS.register("tiny-vit")
class TinyViT(VisionEncoder):
    """Patch embedding + a few pre-norm transformer layers; options: patch, dim, depth, heads."""

    grid_kind = "patch grid"
    OPTIONS: ClassVar[dict[str, Any]] = {"patch": int, "dim": int, "depth": int, "heads": int}

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        opts = {"patch": 16, "dim": 64, "depth": 2, "heads": 4, **cfg.options}
        self.image_size = cfg.image_size or 224
        self.patch = int(opts["patch"])
        if self.image_size % self.patch:
            raise ValueError(f"image size {self.image_size} is not divisible by patch {self.patch}")
        self.dim = int(opts["dim"])
        side = self.image_size // self.patch
        self.embed = nn.Conv2d(3, self.dim, self.patch, self.patch)
        self.pos = nn.Parameter(torch.randn(1, side * side, self.dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(self.dim, int(opts["heads"]), 2 * self.dim, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(int(opts["depth"]))
        )
        self.norm = nn.LayerNorm(self.dim)

    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch
        return side, side

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixels).flatten(2).transpose(1, 2) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)
