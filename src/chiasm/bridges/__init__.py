"""Bridges, registered by exact name.

linear, mlp, pixel_shuffle, pooling, c_abstractor, resampler, perceiver, qformer, gated_xattn.
"""

from chiasm.bridges import compress, gated_xattn, projectors, qformer, resamplers  # noqa: F401  (registration)
from chiasm.bridges.base import BRIDGES, Bridge, build_bridge

__all__ = ["BRIDGES", "Bridge", "build_bridge"]
