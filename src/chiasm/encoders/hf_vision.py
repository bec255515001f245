"""Any transformers vision tower (CLIP, SigLIP, DINOv2, ViT) by hub id or local folder.

The tower's hidden states at ``feature_layer`` are the features (LLaVA uses the
penultimate layer, -2). Leading class/register tokens are dropped so the rest is a grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from chiasm.checkpointing import enable_module_checkpointing
from chiasm.config import EncoderConfig
from chiasm.encoders.base import ENCODERS, VisionEncoder


def _vision_part(model: nn.Module) -> nn.Module:
    """Dual towers (CLIPModel, SiglipModel) keep the image side in ``vision_model``."""
    return getattr(model, "vision_model", model)


@ENCODERS.register("hf-vision")
class HFVisionTower(VisionEncoder):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if not cfg.source:
            raise ValueError("encoder 'hf-vision' needs `source`: a hub id or a local folder")
        config = AutoConfig.from_pretrained(cfg.source)
        vision_config = getattr(config, "vision_config", config)
        if cfg.options.get("pretrained", True):
            model = AutoModel.from_pretrained(cfg.source)
        else:
            model = AutoModel.from_config(config)
        self.tower = _vision_part(model)
        self.feature_layer = cfg.feature_layer
        self.dim = int(vision_config.hidden_size)
        self.image_size = int(getattr(vision_config, "image_size", cfg.image_size))
        patch = int(vision_config.patch_size)
        self._side = self.image_size // patch
        mean, std = self._normalisation(cfg.source)
        self.mean, self.std = mean, std

    @staticmethod
    def _normalisation(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(source)
            return tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, AttributeError, ImportError):
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def grid(self) -> tuple[int, int]:
        return self._side, self._side

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]
        n_grid = self._side * self._side
        extra = hidden.shape[1] - n_grid
        if extra < 0 or (extra and math.isqrt(hidden.shape[1] - extra) ** 2 != n_grid):
            raise ValueError(f"tower returned {hidden.shape[1]} tokens, expected {n_grid} (+ class tokens)")
        return hidden[:, extra:]

    def enable_checkpointing(self) -> bool:
        return enable_module_checkpointing(self.tower) > 0

    def blocks(self) -> list[nn.Module]:
        encoder = getattr(self.tower, "encoder", None)
        layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
        if layers is None:
            raise NotImplementedError("this tower does not expose encoder layers")
        return list(layers)
