"""Bridges, registered by exact name.

linear, mlp, pixel_shuffle, pooling, c_abstractor, resampler, perceiver, qformer, gated_xattn,
visual_expert.
"""

from chiasm.bridges import (  # noqa: F401  (registration)
    compress,
    gated_xattn,
    projectors,
    qformer,
    resamplers,
    visual_expert,
)
from chiasm.bridges.base import BRIDGES, Bridge, build_bridge

__all__ = ["BRIDGES", "Bridge", "build_bridge"]
