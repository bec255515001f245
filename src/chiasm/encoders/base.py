"""The encoder seam: pixels (B,3,H,W) -> features (B,N,Dv) on an h x w grid (N = h*w)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from PIL import Image
from torch import nn

from chiasm.config import EncoderConfig
from chiasm.registry import Registry


class VisionEncoder(nn.Module, ABC):
    """Base class of every vision encoder.

    Subclasses set ``dim`` (feature width), ``image_size`` and the normalisation
    ``mean``/``std`` they were trained with, and implement ``grid`` and ``forward``.
    """

    dim: int
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """The (h, w) feature grid this encoder produces at ``image_size``."""

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features ``(B, h*w, dim)``, row-major over the grid."""

    def blocks(self) -> list[nn.Module]:
        """Ordered trunk blocks, used by the ``last_n`` training policy."""
        raise NotImplementedError(f"{type(self).__name__} does not expose blocks for the last_n policy")

    def enable_checkpointing(self) -> bool:
        """Recompute this encoder's layer activations in the backward pass; False if it has no such mode."""
        return False

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> normalised ``(3, S, S)`` tensor at this encoder's resolution."""
        img = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (arr - mean) / std


ENCODERS: Registry[VisionEncoder] = Registry("encoder")


def build_encoder(cfg: EncoderConfig) -> VisionEncoder:
    """Instantiate the encoder named in ``cfg`` (exact registry name)."""
    # Importing the package registers every built-in encoder.
    import chiasm.encoders  # noqa: F401

    encoder = ENCODERS.get(cfg.name)(cfg)
    # What decides the features beyond the weights (layers read, grid): part of the cache key.
    encoder.cache_key = repr((cfg.name, cfg.image_size, sorted(cfg.options.items())))
    return encoder
