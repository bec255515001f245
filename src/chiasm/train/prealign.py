"""What the pre-alignment objectives (contrastive, words) share: they train the bridge alone.

Both read cached encoder features and the LM's frozen input embeddings, never run the LM,
and must refuse set-ups where that is not true.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from chiasm.config import StageConfig
from chiasm.data.sample import DataError, Sample
from chiasm.model import VisionLanguageModel
from chiasm.train.features import FeatureCache

log = logging.getLogger(__name__)
T = TypeVar("T")


def check_bridge_only(model: VisionLanguageModel, stage: StageConfig, kind: str) -> None:
    """Refuse a trainable encoder or LM (features come from the cache, the LM is only read) and in-LM bridges."""
    if stage.encoder.mode != "frozen" or stage.lm.mode != "frozen":
        raise ValueError(f"stage {stage.name!r}: a {kind} stage needs the encoder and the LM frozen "
                         f"(got encoder {stage.encoder.mode!r}, lm {stage.lm.mode!r})")
    if model.bridge.in_lm:
        raise ValueError(f"stage {stage.name!r}: a {kind} stage needs a prefix bridge; "
                         f"{type(model.bridge).__name__} works inside the LM's layers")


def read_samples(samples: list[Sample], stage: StageConfig,
                 read: Callable[[Sample], T]) -> tuple[list[Sample], list[T], list[tuple[str, str]]]:
    """``read`` each sample; a :class:`DataError` stops the stage, or with ``on_error = "skip"`` drops
    the sample, counted in one warning. Returns the kept samples, what was read from them, and the
    (id, reason) of each skipped one."""
    kept, values, skipped = [], [], []
    for s in samples:
        try:
            value = read(s)
        except DataError as err:
            if stage.on_error != "skip":
                raise
            skipped.append((s.id, str(err)))
            continue
        kept.append(s)
        values.append(value)
    if skipped:
        log.warning("stage %s: skipped %d of %d samples (first: %s)", stage.name, len(skipped), len(samples),
                    skipped[0][1])
    return kept, values, skipped


def bridge_tokens(model: VisionLanguageModel, bridge: nn.Module, features: FeatureCache,
                  paths: list[str]) -> torch.Tensor:
    """Visual tokens of ``paths`` from their cached features, through ``bridge`` (the bridge or its DDP wrapper)."""
    feats = features.lookup(paths).to(model.device, model.bridge_dtype)
    return bridge(feats, model.encoder.grid())
