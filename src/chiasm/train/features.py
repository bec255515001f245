"""The feature cache lives in :mod:`chiasm.features` (evaluation uses it too); kept here for old imports."""

from chiasm.features import FeatureCache, MemmapFeatureCache

__all__ = ["FeatureCache", "MemmapFeatureCache"]
