"""Length-grouped batching: samples of similar length share a micro-batch, so little is padding.

As in LLaVA's ``group_by_modality_length``, each epoch's shuffled order is cut into
mega-batches (here: the samples of ``steps`` optimizer steps); inside one mega-batch the
samples are sorted by length, cut into micro-batches, and those micro-batches are shuffled.
Everything is seeded by (stage seed, epoch), so the order stays a pure function of
(seed, stage, step) and a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from chiasm.config import StageConfig
from chiasm.data.sample import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, DataError, Sample
from chiasm.model import VisionLanguageModel


def estimate_lengths(samples: Sequence[Sample], tokenizer: PreTrainedTokenizerBase,
                     tokens_per_image: int, image_tokens: Callable[[Sample], int] | None = None,
                     tokens_per_audio: int = 0) -> list[int]:
    """Tokens of each sample's turns (one batched tokenizer call) plus its image and audio tokens.

    The chat template's few tokens per turn are left out: they shift every sample alike
    and sorting needs only the order, so the whole data set is never rendered up front.
    ``image_tokens`` counts a sample's image tokens where they depend on the images (tiles,
    from each file's header); a sample it cannot count (a broken image, refused later with
    its name) is taken as ``tokens_per_image`` per image. Each clip of a model that hears takes
    ``tokens_per_audio`` positions, its placeholder's text none.
    """
    texts = [t.text.replace(IMAGE_PLACEHOLDER, "").replace(AUDIO_PLACEHOLDER, "")
             for s in samples for t in s.conversations]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    out, at = [], 0
    for s in samples:
        k = len(s.conversations)
        n_image = len(s.images) * tokens_per_image
        if image_tokens is not None and s.images:
            try:
                n_image = image_tokens(s)
            except DataError:
                pass
        out.append(sum(counts[at : at + k]) + n_image + len(s.audios) * tokens_per_audio)
        at += k
    return out


def length_grouped_order(lengths: Sequence[int], micro_batch: int, mega_batch: int,
                         seed: int) -> Callable[[list[int], int], list[int]]:
    """A reordering of an epoch's permutation (see ``StagePlan``'s ``order``)."""
    if mega_batch < micro_batch or mega_batch % micro_batch:
        raise ValueError(f"mega-batch of {mega_batch} samples is not a multiple of the micro-batch {micro_batch}")

    def order(perm: list[int], epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        out: list[int] = []
        for start in range(0, len(perm), mega_batch):
            mega = sorted(perm[start : start + mega_batch], key=lambda i: (-lengths[i], i))
            chunks = [mega[k : k + micro_batch] for k in range(0, len(mega), micro_batch)]
            full = [c for c in chunks if len(c) == micro_batch]
            # A partial chunk (only at the epoch's tail, never read by a step) stays last.
            shuffled = [full[k] for k in torch.randperm(len(full), generator=g).tolist()]
            out.extend(i for c in shuffled + chunks[len(full):] for i in c)
        return out

    return order


def stage_order(stage: StageConfig, samples: Sequence[Sample], model: VisionLanguageModel, world: int,
                seed: int) -> Callable[[list[int], int], list[int]] | None:
    """The stage's ``group_by_length`` reordering for ``StagePlan``, or None when it is off."""
    if stage.group_by_length < 0:
        raise ValueError(f"stage {stage.name!r}: group_by_length is a number of optimizer steps (0: off), "
                         f"not {stage.group_by_length}")
    if not stage.group_by_length:
        return None
    per_step = stage.batch_size * stage.grad_accum * world
    conv = model.processor.conversation
    count = None if model.config.tiling is None else (lambda s: sum(conv.image_lengths(s)))
    lengths = estimate_lengths(samples, model.tokenizer, model.tokens_per_image, count, conv.tokens_per_audio)
    return length_grouped_order(lengths, stage.batch_size, per_step * stage.group_by_length, seed)
