"""The LM stages' data path: a ``torch.utils.data`` DataLoader over the stage plan.

Samples are tokenised and their images decoded lazily, in ``__getitem__`` (in worker
processes when ``num_workers > 0``), so a run over millions of samples starts at once and
holds only the batches in flight. Which samples make up micro-batch ``m`` of step ``s`` on
rank ``r`` is still ``StagePlan.indices(s, m, r)``: the batch sampler just walks the plan
from the first step to run, so each rank reads its own disjoint share of every global step
and a resumed run reads exactly the batches an uninterrupted run would have.

A sample that fails (its conversation does not tokenise, an image does not decode) comes
back from the worker as a :class:`DataError` naming the data file and the sample id. Under
``on_error = "raise"`` it is raised in the training process; under ``"skip"`` the batch goes
on without the sample and the sample is recorded (``skipped`` here; the trainer passes them to
the stage's :class:`chiasm.train.skips.SkipLog`, which writes ``skipped.jsonl``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from chiasm.config import StageConfig
from chiasm.conversation import ConversationEncoder
from chiasm.data.images import load_image
from chiasm.data.sample import DataError, Sample
from chiasm.features import FeatureCache
from chiasm.model import VisionLanguageModel
from chiasm.processor import as_views, sample_audio
from chiasm.train.batches import Batch
from chiasm.train.packing import build_rows, check_packable, pack_rows
from chiasm.train.skips import loader_skips_before

if TYPE_CHECKING:
    from chiasm.train.trainer import StagePlan

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One tokenised sample with its images: pixels, or cached features when a cache is used."""

    index: int
    sample_id: str
    source: str
    input_ids: list[int]
    labels: list[int]
    image_paths: list[str]
    images: torch.Tensor | None  # (n_images, 3, H, W) pixels or (n_images, N, Dv) features
    audio: torch.Tensor | None = None  # (n_clips, n_mels, frames) log-mel windows, for a model that hears


@dataclass
class Failed:
    """A sample whose tokenising or image reading raised; the training process decides what to do."""

    index: int
    error: DataError


@dataclass
class LoaderBatch(Batch):
    """A :class:`Batch` (whose ``skipped`` lists the samples left out) plus what packing adds."""

    position_ids: torch.Tensor | None = None  # packed rows only
    sample_ids: list[str] = field(default_factory=list)

    def to(self, device: torch.device) -> LoaderBatch:
        moved = super().to(device)
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return LoaderBatch(moved.input_ids, moved.attention_mask, moved.labels, moved.image_paths, moved.features,
                           moved.pixels, skipped=self.skipped, audio=moved.audio, position_ids=pos,
                           sample_ids=self.sample_ids)


class SampleDataset(Dataset):
    """Tokenises sample ``i`` and reads its images when asked, never before.

    Give ``features`` (a frozen encoder's cache) or ``preprocess`` (the encoder's image
    preprocessing, whose pixels the model then encodes every step).
    """

    def __init__(self, samples: Sequence[Sample], encoder: ConversationEncoder, *,
                 features: FeatureCache | None = None,
                 preprocess: Callable[..., torch.Tensor] | None = None, max_pixels: int | None = None,
                 audio: Callable[[Path], torch.Tensor] | None = None):
        if (features is None) == (preprocess is None):
            raise ValueError("SampleDataset needs exactly one of a feature cache or an image preprocessing")
        self.samples, self.encoder, self.features, self.preprocess = samples, encoder, features, preprocess
        self.max_pixels = max_pixels  # see chiasm.data.images.load_image
        self.audio = audio  # audio file -> log-mel window (a model that hears)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Item | Failed:
        s = self.samples[i]
        try:
            enc = self.encoder.encode(s)
            paths = [str(p) for p in s.images]
            return Item(i, s.id, s.source, enc.input_ids, enc.labels, paths, self._images(s, paths), self._audio(s))
        except DataError as err:
            if err.sample_id is None:  # e.g. a feature-cache lookup: name the sample here
                err = DataError(err.message, source=s.source, sample_id=s.id, image=err.image)
            return Failed(i, err)

    def _audio(self, s: Sample) -> torch.Tensor | None:
        clips = sample_audio(s, self.audio)
        return torch.stack(clips) if clips else None

    def _images(self, s: Sample, paths: list[str]) -> torch.Tensor | None:
        if not paths:
            return None
        if self.features is not None:
            return self.features.lookup(paths)
        return torch.cat([as_views(self.preprocess(load_image(Path(p), sample_id=s.id, source=s.source,
                                                               max_pixels=self.max_pixels))) for p in paths])


class Collator:
    """Items of one micro-batch -> a :class:`LoaderBatch`; failed items are listed, not batched.

    ``pack_length`` > 0 packs the samples into rows of at most that many tokens
    (see :mod:`chiasm.train.packing`).
    """

    def __init__(self, pad_id: int, *, pack_length: int = 0, cached: bool = True):
        # cached: items carry feature-cache rows (else pixels for the encoder)
        self.pad_id, self.pack_length, self.cached = pad_id, pack_length, cached

    def __call__(self, got: list[Item | Failed]) -> LoaderBatch:
        items = [g for g in got if isinstance(g, Item)]
        skipped = [g.error for g in got if isinstance(g, Failed)]
        if self.pack_length:
            items, too_long = _fits(items, self.pack_length)
            skipped += too_long
        if not items:
            return LoaderBatch(*_empty(), [], skipped=skipped)
        seqs = [(it.input_ids, it.labels) for it in items]
        if self.pack_length:
            rows = pack_rows([len(ids) for ids, _ in seqs], self.pack_length)
        else:
            rows = [[i] for i in range(len(items))]
        ids, mask, labels, pos = build_rows(seqs, rows, self.pad_id, packed=bool(self.pack_length))
        # Images in placeholder order: row by row, sample by sample (the order embed() consumes).
        ordered = [items[i] for row in rows for i in row]
        paths = [p for it in ordered for p in it.image_paths]
        images = [it.images for it in ordered if it.images is not None]
        stacked = torch.cat(images) if images else None
        clips = [it.audio for it in ordered if it.audio is not None]  # placeholder order, as for images
        batch = LoaderBatch(ids, mask, labels, paths, position_ids=pos, sample_ids=[it.sample_id for it in ordered],
                            skipped=skipped, audio=torch.cat(clips) if clips else None)
        if self.cached:
            batch.features = stacked
        else:
            batch.pixels = stacked
        return batch


def _fits(items: list[Item], capacity: int) -> tuple[list[Item], list[DataError]]:
    kept, errors = [], []
    for it in items:
        if len(it.input_ids) > capacity:
            errors.append(DataError(f"{len(it.input_ids)} tokens do not fit the packing length {capacity}",
                                    source=it.source, sample_id=it.sample_id))
        else:
            kept.append(it)
    return kept, errors


def _empty() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = torch.zeros((0, 0), dtype=torch.long)
    return z, z.clone(), z.clone()


class PlanBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches, step by step from ``start_step``: ``plan.indices(step, micro, rank)``."""

    def __init__(self, plan: StagePlan, rank: int, start_step: int = 0):
        self.plan, self.rank, self.start_step = plan, rank, start_step

    def positions(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start_step, self.plan.total):
            for micro in range(self.plan.stage.grad_accum):
                yield step, micro

    def __iter__(self) -> Iterator[list[int]]:
        for step, micro in self.positions():
            yield self.plan.indices(step, micro, self.rank)

    def __len__(self) -> int:
        return (self.plan.total - self.start_step) * self.plan.stage.grad_accum


class StageLoader:
    """Iterates one rank's micro-batches of an LM stage, handling failed samples per ``on_error``."""

    def __init__(self, samples: Sequence[Sample], model: VisionLanguageModel, stage: StageConfig, plan: StagePlan,
                 *, rank: int = 0, world: int = 1, start_step: int = 0, features: FeatureCache | None = None,
                 stage_dir: Path | None = None):
        if stage.pack_length < 0 or stage.num_workers < 0:
            raise ValueError(f"stage {stage.name!r}: pack_length ({stage.pack_length}) and num_workers "
                             f"({stage.num_workers}) must be 0 or more")
        if stage.pack_length:
            check_packable(model, stage.pack_length, stage.name)
        self.stage, self.rank, self.world, self.stage_dir = stage, rank, world, stage_dir
        processor = model.processor  # the tokenizer and image steps inference uses too
        dataset = SampleDataset(samples, processor.conversation, features=features,
                                preprocess=None if features is not None else processor.image_views,
                                max_pixels=stage.max_image_pixels,
                                audio=processor.load_audio if processor.audio is not None else None)
        self.sampler = PlanBatchSampler(plan, rank, start_step)
        if stage.num_workers:
            # Fast tokenizers warn (and turn their threads off) in forked workers; say so up front.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Its own generator: the iterator, made at the first batch, draws its workers' base seed
        # from it, not from the global RNG that a resumed run has just restored from its checkpoint.
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=stage.num_workers,
                                 collate_fn=Collator(processor.pad_token_id, pack_length=stage.pack_length,
                                                     cached=features is not None),
                                 generator=torch.Generator().manual_seed(plan.seed))
        self.skipped: list[dict] = loader_skips_before(stage_dir, start_step) if rank == 0 else []

    def batch(self, indices: Sequence[int]) -> LoaderBatch:
        """The batch of ``indices``, read in this process (e.g. a trial forward before wrapping the model)."""
        return self.loader.collate_fn([self.loader.dataset[i] for i in indices])

    def __iter__(self) -> Iterator[LoaderBatch | None]:
        """One batch per (step, micro) in plan order; None where every sample of it was skipped."""
        for (step, micro), batch in zip(self.sampler.positions(), self.loader, strict=True):
            for err in batch.skipped:
                if self.stage.on_error != "skip":
                    raise err
                self.skipped.append({"step": step, "micro": micro, "rank": self.rank, "sample": err.sample_id,
                                     "source": err.source, "image": err.image, "error": str(err)})
                log.warning("stage %s: skipped a sample: %s", self.stage.name, err)
            if not batch.sample_ids:
                if self.world > 1:
                    raise DataError(f"every sample of step {step + 1}, micro-batch {micro} on rank {self.rank} "
                                    "failed; the other ranks would wait for it forever")
                yield None
                continue
            yield batch

    def count(self, device: torch.device) -> int:
        """Samples skipped so far, over all ranks (a collective: every rank must call it)."""
        n = len(self.skipped)
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([n], dtype=torch.long, device=device)
            dist.all_reduce(t)
            n = int(t.item())
        return n

    def gather_skipped(self) -> list[dict]:
        """Every rank's skipped samples, in plan order (a collective: every rank must call it).

        The trainer hands them to the stage's SkipLog, which writes the one skip file
        (``skipped.jsonl``) that the report shows and a resumed run reads back.
        """
        entries = self.skipped
        if dist.is_available() and dist.is_initialized():
            parts: list[list[dict] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.skipped)
            entries = [e for p in parts for e in (p or [])]
        return sorted(entries, key=lambda e: (e["step"], e["micro"], e["rank"]))
