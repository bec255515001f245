"""A stage's objective, chosen by exact name (``StageConfig.objective``).

``lm`` is the trainer's own next-token loss on assistant turns through the LM. Every other
name is a *pre-alignment* objective: it trains the bridge alone on cached encoder
features, with no LM pass (chiasm.train.prealign), and is looked up in :data:`PREALIGN`:
``contrastive`` (chiasm.train.contrastive), the synthetic world's ``words``
(chiasm.synthetic.word_targets) and ``ctc`` for the audio bridge (chiasm.hearing.ctc), each
imported only when a stage names it. An objective trains the image bridge unless it names
another ``component`` (ctc: ``audio_bridge``); one with no image ``paths`` reads no feature cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from chiasm.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from chiasm.config import StageConfig
    from chiasm.data.sample import Sample
    from chiasm.model import VisionLanguageModel
    from chiasm.train.features import FeatureCache

NEXT_TOKEN = "lm"


class PreAlignObjective(Protocol):
    """What the trainer asks of a pre-alignment objective."""

    metric: str  # name of the accuracy logged per step
    paths: list[str]  # image path of each item, for the feature cache (empty: no cache is read)

    def __init__(self, model: VisionLanguageModel, samples: list[Sample], stage: StageConfig) -> None: ...

    def __len__(self) -> int: ...

    def loss(self, indices: list[int], bridge: nn.Module, features: FeatureCache) -> tuple[torch.Tensor, float]:
        """Loss of the items ``indices`` through ``bridge`` (or its DDP wrapper), and the accuracy."""
        ...


PREALIGN: Registry[PreAlignObjective] = Registry("pre-alignment objective", plugins={
    "contrastive": "chiasm.train.contrastive",
    "words": "chiasm.synthetic.word_targets",
    "ctc": "chiasm.hearing.ctc",
})


def objective_names() -> list[str]:
    return sorted([NEXT_TOKEN, *PREALIGN.names()])


def check_objective(name: str) -> None:
    """Refuse an unknown objective name with the list of known ones."""
    if name != NEXT_TOKEN and name not in PREALIGN:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(objective_names())}")


def build_prealign(model: VisionLanguageModel, samples: list[Sample], stage: StageConfig) -> PreAlignObjective | None:
    """The stage's pre-alignment objective, or None for the next-token objective."""
    check_objective(stage.objective)
    if stage.objective == NEXT_TOKEN:
        return None
    return PREALIGN.get(stage.objective)(model, samples, stage)
