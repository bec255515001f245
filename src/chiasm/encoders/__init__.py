"""Vision encoders, registered by exact name: efficientnet-lite0, hf-vision, tiny-vit."""

from chiasm.encoders import efficientnet, hf_vision, tiny_vit  # noqa: F401  (registration)
from chiasm.encoders.base import ENCODERS, VisionEncoder, build_encoder

__all__ = ["ENCODERS", "VisionEncoder", "build_encoder"]
