"""Tokenised samples and the collator that pads them into batches.

Samples are tokenised once up front (so a bad sample fails before hours of training, not
in the middle), and a batch lists its images in placeholder order, which is the order
:meth:`VisionLanguageModel.embed` consumes them in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from chiasm.conversation import IGNORE_INDEX, ConversationEncoder, Encoded
from chiasm.data.images import load_image
from chiasm.data.sample import DataError, Sample
from chiasm.model import VisionLanguageModel
from chiasm.train.features import FeatureCache

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A sample that tokenised cleanly, with the image paths its placeholders refer to."""

    sample: Sample
    encoded: Encoded


def conversation_encoder(model: VisionLanguageModel) -> ConversationEncoder:
    return ConversationEncoder(model.tokenizer, image_token_id=model.image_token_id,
                               tokens_per_image=model.tokens_per_image, max_length=model.max_length,
                               system_prompt=model.config.system_prompt, image_layout=model.config.image_layout)


def prepare(samples: list[Sample], model: VisionLanguageModel, *, on_error: str = "raise",
            for_generation: bool = False) -> tuple[list[Prepared], list[tuple[str, str]]]:
    """Tokenise every sample; on ``skip`` bad ones are counted and logged instead of raised."""
    enc = conversation_encoder(model)
    out, skipped = [], []
    for s in samples:
        try:
            e = enc.encode_prompt(s) if for_generation else enc.encode(s)
        except DataError as exc:
            if on_error != "skip":
                raise
            skipped.append((s.id, str(exc)))
            continue
        out.append(Prepared(s, e))
    if skipped:
        log.warning("skipped %d of %d samples (first: %s)", len(skipped), len(samples), skipped[0][1])
    return out, skipped


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_paths: list[str]
    features: torch.Tensor | None = None
    pixels: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), self.image_paths,
                     move(self.features), move(self.pixels))


def collate(items: list[Prepared], pad_id: int, *, left_pad: bool = False,
            features: FeatureCache | None = None, model: VisionLanguageModel | None = None,
            override_images: list[str] | None = None) -> Batch:
    """Pad to the longest row (right for training, left for generation) and attach images.

    Images come from the feature cache when one is given, else they are loaded and
    preprocessed by the model's encoder. ``override_images`` replaces every image (used to
    test image reliance with a blank picture).
    """
    width = max(len(it.encoded.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    paths: list[str] = []
    for r, it in enumerate(items):
        n = len(it.encoded.input_ids)
        sl = slice(width - n, width) if left_pad else slice(0, n)
        ids[r, sl] = torch.tensor(it.encoded.input_ids)
        labels[r, sl] = torch.tensor(it.encoded.labels)
        mask[r, sl] = 1
        paths.extend(str(p) for p in it.sample.images)
    if override_images is not None:
        paths = [override_images[0]] * len(paths)
    batch = Batch(ids, mask, labels, paths)
    if not paths:
        return batch
    if features is not None:
        batch.features = features.lookup(paths)
    elif model is not None:
        by_sample = {str(p): it for it in items for p in it.sample.images}
        batch.pixels = torch.stack([
            model.encoder.preprocess(load_image(Path(p), sample_id=by_sample[p].sample.id if p in by_sample else None,
                                                source=by_sample[p].sample.source if p in by_sample else None))
            for p in paths])
    else:
        raise ValueError("collate needs a feature cache or a model to load images")
    return batch
