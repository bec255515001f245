"""Batches for training: the processor's prepare/collate (:mod:`chiasm.processor`), called with a model.

Tokenising and collating live in the processor, which inference uses too; these wrappers
keep the trainer's call shape (a model in hand) and old imports working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from chiasm.conversation import ConversationEncoder
from chiasm.data.sample import Sample
from chiasm.features import FeatureCache
from chiasm.processor import Batch, Prepared, Processor, collate_items

if TYPE_CHECKING:
    from chiasm.model import VisionLanguageModel

__all__ = ["Batch", "Prepared", "Processor", "collate", "conversation_encoder", "prepare"]


def conversation_encoder(model: VisionLanguageModel) -> ConversationEncoder:
    return model.processor.conversation


def prepare(samples: Sequence[Sample], model: VisionLanguageModel, *, on_error: str = "raise",
            for_generation: bool = False) -> tuple[list[Prepared], list[tuple[str, str]]]:
    """Tokenise every sample with the model's processor (see :meth:`Processor.prepare`)."""
    return model.processor.prepare(samples, on_error=on_error, for_generation=for_generation)


def collate(items: list[Prepared], pad_id: int, *, left_pad: bool = False, features: FeatureCache | None = None,
            model: VisionLanguageModel | None = None, override_images: list[str] | None = None,
            on_error: str = "raise", max_pixels: int | None = None) -> Batch:
    """Pad and attach images: from the feature cache if given, else through the model's processor."""
    preprocess = model.processor.image_views if model is not None else None
    return collate_items(items, pad_id, left_pad=left_pad, features=features, preprocess=preprocess,
                         override_images=override_images, on_error=on_error, max_pixels=max_pixels)
