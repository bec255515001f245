"""The encoder seam: pixels (B,3,H,W) -> features (B,N,Dv) on an h x w grid (N = h*w)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from chiasm.config import EncoderConfig
from chiasm.encoders.preprocessing import ImagePreprocessing
from chiasm.options import check_options
from chiasm.registry import Registry


class VisionEncoder(nn.Module, ABC):
    """Base class of every vision encoder.

    Subclasses set ``dim`` (feature width), ``image_size`` and the normalisation
    ``mean``/``std`` they were trained with (or a whole ``preprocessing`` read from their
    checkpoint), declare their ``OPTIONS`` (name -> type) and implement ``grid`` and ``forward``.
    """

    dim: int
    image_size: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    pad_to_square: bool = False
    # What one cell of ``grid()`` is, in words: a ViT's patch, a CNN's feature-map position (shown by explain).
    grid_kind: ClassVar[str] = "feature grid"
    # Options this encoder reads from ``EncoderConfig.options``; anything else is a config error.
    OPTIONS: ClassVar[dict[str, Any]] = {}
    # Options every encoder takes (read by ``build_encoder`` and the preprocessing).
    COMMON_OPTIONS: ClassVar[dict[str, Any]] = {"pad_to_square": bool}
    _preprocessing: ImagePreprocessing | None = None

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        return {**cls.COMMON_OPTIONS, **cls.OPTIONS}

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

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """The image -> pixels steps: set explicitly (from a checkpoint), else a square resize + mean/std."""
        if self._preprocessing is not None:
            return self._preprocessing
        return ImagePreprocessing(size=(self.image_size, self.image_size), mean=self.mean, std=self.std,
                                  pad_to_square=self.pad_to_square)

    @preprocessing.setter
    def preprocessing(self, value: ImagePreprocessing) -> None:
        if value.output_size != (self.image_size, self.image_size):
            raise ValueError(f"{type(self).__name__} takes {self.image_size} x {self.image_size} pixels; the image "
                             f"preprocessing gives {value.output_size or 'a size that depends on the image'}")
        self._preprocessing = value

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> normalised ``(3, S, S)`` tensor at this encoder's resolution."""
        return self.preprocessing(image)

    def export(self, folder: Path) -> None:
        """Write what rebuilding this encoder needs besides chiasm's config and its weights.

        Encoders defined by chiasm's config alone need nothing; a transformers tower writes its
        own config (see ``hf_vision``), so that a saved model never needs the original source.
        """


# chiasm-clip lives with the CLIP code (it reads a CLIP model folder); importing it on first use keeps the
# encoders package free of CLIP imports.
ENCODERS: Registry[VisionEncoder] = Registry("encoder", plugins={"chiasm-clip": "chiasm.clip.encoder"})


def build_encoder(cfg: EncoderConfig, *, pretrained: bool = True) -> VisionEncoder:
    """Instantiate the encoder named in ``cfg`` (exact registry name), its options checked.

    ``pretrained=False`` skips reading pretrained weights (for callers that load saved weights next).
    """
    # Importing the package registers every built-in encoder.
    import chiasm.encoders  # noqa: F401

    cls = ENCODERS.get(cfg.name)
    options = check_options("encoder", cfg.name, cfg.options, cls.option_types())
    if not pretrained and "pretrained" in cls.OPTIONS:
        options["pretrained"] = False
    encoder = cls(replace(cfg, options=options))
    encoder.pad_to_square = bool(options.get("pad_to_square", False))
    # What decides the features beyond the weights (layers read, grid): part of the cache key.
    encoder.cache_key = repr((cfg.name, cfg.image_size, sorted(cfg.options.items())))
    return encoder
