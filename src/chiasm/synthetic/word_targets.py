"""Pre-alignment by word regression (``words``): each named group of visual tokens learns to *be* its phrase.

The contrastive objective (chiasm.train.contrastive) makes a visual token point towards a
phrase's words, but it scores directions against a batch: the tokens end up near a blend of
words, which the LM must still learn to read. Here the target is exact. With an image
layout that names groups of tokens (the synthetic world's ``quadrants``: "top left:
<v><v><v><v> in the top left"), the phrase grounded in a group (the region whose box centre
lies in it) is tokenised and its word embeddings are the targets of the group's tokens, in
order; a group with no region says ``empty_phrase``. After this stage the LM reads "top
left: small small red circle in the top left" in its own input embeddings, as if the scene
had been written out, and the *align* and *instruct* stages start from text it already
understands. The objective lives with the synthetic world because it needs short phrases,
at most one per group, which that world guarantees.

Why it can work at all: the bridge must emit several different words from what it sees of
one object, so each group's tokens should come from features that see the whole object.
The demo pools the encoder's map to one feature per quadrant and lets the MLP bridge emit a
2 x 2 block of tokens from each (``upsample = 2``); with several features per quadrant, each
covering part of it, the colour slot is often wrong (the README records the probe).

With a layout that names no groups (``raster``, the default), the whole image is one group
and says one phrase: the phrase of its only region, or without regions its caption (the
sample's one answer). Several images of one conversation then reach the LM as their captions'
own words, which its pretrained copy-and-match heads already compare (``chiasm world
which_image``: "Which image has the blue circle?").

A phrase shorter than its group is stretched over it (each word held for as many tokens as
it takes, "small small red circle"), so every token has a word and none is left free; one
longer than its group is an error, since the group cannot say it. No LM forward pass is
needed: a step costs milliseconds on cached features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chiasm.config import StageConfig
from chiasm.data.regions import sample_regions
from chiasm.data.sample import DataError, Sample
from chiasm.layout import get_layout
from chiasm.model import VisionLanguageModel
from chiasm.train.features import FeatureCache
from chiasm.train.objectives import PREALIGN
from chiasm.train.prealign import bridge_tokens, check_bridge_only, read_samples


def stretch(words: list[int], slots: int) -> list[int]:
    """``words`` spread over ``slots`` positions in order, each held as evenly as possible."""
    if not words:
        raise ValueError("a phrase needs at least one token")
    if len(words) > slots:
        raise ValueError(f"{len(words)} tokens do not fit a group of {slots}")
    return [words[j * len(words) // slots] for j in range(slots)]


def word_regression_loss(visual: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean squared error to the target embeddings, relative to the words' mean squared size.

    A plain MSE (not a cosine) because the LM reads magnitudes too: a token at the word's
    direction but twice its norm is not that word to the LM's first layer norm's input.
    """
    return F.mse_loss(visual.float(), targets.float()) / scale


@PREALIGN.register("words")
class WordTargetObjective:
    """Everything the trainer needs for an ``objective = "words"`` stage (see the module docstring)."""

    metric = "word_acc"

    def __init__(self, model: VisionLanguageModel, samples: list[Sample], stage: StageConfig):
        check_bridge_only(model, stage, "words")
        name = model.config.image_layout
        self.layout = get_layout(name)
        grid = model.bridge.token_grid(model.encoder.grid())
        self.groups = self.layout.token_groups(grid, model.tokens_per_image)
        self.whole_image = not self.groups
        if self.whole_image:
            self.groups = [("image", list(range(model.tokens_per_image)))]
        self.model = model
        self.empty_phrase = stage.empty_phrase
        self._ids: dict[str, list[int]] = {}  # phrase -> token ids: a world repeats few phrases many times
        self.samples, rows, self.skipped = read_samples(samples, stage, self._targets)
        if not self.samples:
            raise ValueError(f"stage {stage.name!r}: no usable grounded samples in {stage.data}")
        self.targets = torch.tensor(rows)  # (n, tokens_per_image): word id of each token, bridge order
        self.paths = [str(s.images[0]) for s in self.samples]
        self.vocab = self.targets.unique()
        table = model.lm.get_input_embeddings().weight.detach()
        self.scale = float(table[self.vocab].float().pow(2).mean())

    def _words(self, phrase: str) -> list[int]:
        if phrase not in self._ids:
            # A leading space: the words take the form they have inside a sentence.
            self._ids[phrase] = self.model.tokenizer(" " + phrase.strip(), add_special_tokens=False).input_ids
        return self._ids[phrase]

    def _targets(self, sample: Sample) -> list[int]:
        if len(sample.images) != 1:
            raise DataError("a words stage reads one image per sample", source=sample.source, sample_id=sample.id)
        row = [0] * self.model.tokens_per_image
        for (name, members), phrase in zip(self.groups, self._group_phrases(sample), strict=True):
            phrase = self.empty_phrase if phrase is None else phrase
            words = self._words(phrase)
            if len(words) > len(members):
                raise DataError(f"phrase {phrase!r} is {len(words)} tokens; the {name} group has only "
                                f"{len(members)}", source=sample.source, sample_id=sample.id)
            for index, word in zip(members, stretch(words, len(members)), strict=True):
                row[index] = word
        return row

    def _group_phrases(self, sample: Sample) -> list[str | None]:
        """Each group's phrase, in group order; None where no region lies."""
        if self.whole_image:
            return [self._image_phrase(sample)]
        per_group: list[str | None] = [None] * len(self.groups)
        for region in sample_regions(sample):
            x0, y0, x1, y1 = region.box
            k = self.layout.group_at((x0 + x1) / 2, (y0 + y1) / 2)
            if per_group[k] is not None:
                raise DataError(f"regions {per_group[k]!r} and {region.phrase!r} both lie in the "
                                f"{self.groups[k][0]} group; a words stage needs at most one per group",
                                source=sample.source, sample_id=sample.id)
            per_group[k] = region.phrase
        return per_group

    @staticmethod
    def _image_phrase(sample: Sample) -> str:
        """The one phrase of a whole image: its only region's, or its caption (one human and one gpt turn)."""
        if sample.meta.get("regions") is not None:
            regions = sample_regions(sample)
            if len(regions) != 1:
                raise DataError(f"{len(regions)} regions; with the whole image as one group a words stage "
                                "needs exactly one", source=sample.source, sample_id=sample.id)
            return regions[0].phrase
        answers = [t.text for t in sample.conversations if t.role == "gpt"]
        if len(answers) != 1 or not answers[0].strip():
            raise DataError(f"{len(answers)} answers and no regions; with the whole image as one group a "
                            "words stage reads the caption: one non-empty answer", source=sample.source,
                            sample_id=sample.id)
        return answers[0]

    def __len__(self) -> int:
        return len(self.samples)

    def loss(self, indices: list[int], bridge: nn.Module, features: FeatureCache) -> tuple[torch.Tensor, float]:
        """Loss of one batch and the share of tokens whose nearest stage word is their target."""
        device = self.model.device
        visual = bridge_tokens(self.model, bridge, features, [self.paths[i] for i in indices])
        table = self.model.lm.get_input_embeddings().weight.detach()
        ids = self.targets[indices].to(device)
        loss = word_regression_loss(visual, table[ids], self.scale)
        with torch.no_grad():
            vocab = self.vocab.to(device)
            cos = F.normalize(visual.float(), dim=-1) @ F.normalize(table[vocab].float(), dim=-1).T
            accuracy = float((vocab[cos.argmax(-1)] == ids).float().mean())
        return loss, accuracy
