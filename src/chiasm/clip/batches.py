"""Which pairs make up step ``s`` on rank ``r``, and turning them into tensors.

As in VLM training, a batch is a pure function of (seed, step): an epoch is a seeded
permutation of the set, each global batch a window of it, each rank a slice of that window,
and the caption of a pair with several (templates, COCO-style captions) is drawn with a
generator seeded by (seed, step, index). So a checkpoint's data position is its step, and a
resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from chiasm.clip.pairs import PairSet
from chiasm.clip.shards import stream
from chiasm.data.sample import DataError


class Plan:
    def __init__(self, n: int, batch_size: int, world: int, seed: int):
        if batch_size % world:
            raise ValueError(f"train.batch_size {batch_size} must divide evenly over {world} processes")
        if n < batch_size:
            raise ValueError(f"{n} training pairs is fewer than one batch of {batch_size}")
        self.n, self.batch, self.world, self.seed = n, batch_size, world, seed
        self.per_epoch = n // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, step: int, rank: int) -> list[int]:
        epoch, within = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        b = self.batch // self.world
        start = within * self.batch + rank * b
        return self._perm[1][start: start + b].tolist()


def pick_caption(captions: list[str], seed: int, step: int, index: int) -> str:
    if len(captions) == 1:
        return captions[0]
    return random.Random(f"{seed}/{step}/{index}").choice(captions)


@dataclass
class Batch:
    indices: list[int]
    pixels: torch.Tensor | None  # None when the image trunk is locked and cached
    captions: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample, why): images that failed to decode


class StepBatches(Dataset):
    """Item ``s`` is step ``s``'s batch for this rank (so DataLoader workers prepare steps ahead)."""

    def __init__(self, pairs: PairSet, plan: Plan, rank: int, preprocess: Callable | None,
                 pixel_cache: torch.Tensor | None = None, skip_bad: bool = False):
        self.pairs, self.plan, self.rank, self.preprocess, self.cache = pairs, plan, rank, preprocess, pixel_cache
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int) -> Batch:
        idx = self.plan.indices(step, self.rank)
        skipped: list[tuple[str, str]] = []
        if self.cache is not None:
            pixels = self.cache[idx].float()
        elif self.preprocess is not None:
            images = []
            for k, i in enumerate(idx):
                x, idx[k] = self._decode(i, skipped)
                images.append(x)
            pixels = torch.stack(images)
        else:
            pixels = None
        captions = [pick_caption(self.pairs.captions(i), self.plan.seed, step, i) for i in idx]
        return Batch(idx, pixels, captions, skipped)

    def _decode(self, i: int, skipped: list[tuple[str, str]]) -> tuple[torch.Tensor, int]:
        """Sample ``i``'s pixels; with ``skip_bad`` a sample whose image fails stands aside for the next
        one (the batch keeps its size, which every rank's all-gather needs)."""
        n = len(self.pairs)
        for j in range(i, i + n):
            try:
                return self.preprocess(self.pairs.image(j % n)), j % n
            except DataError as exc:
                if not self.skip_bad:
                    raise
                skipped.append((self.pairs.ids[j % n], str(exc)))
        raise DataError(f"{self.pairs.name}: no image could be decoded")


class StreamBatches(IterableDataset):
    """Batches from tar shards, in a fixed order; ``skip`` batches are passed over (resume)."""

    def __init__(self, files: list, batch_size: int, rank: int, world: int, seed: int, preprocess: Callable,
                 skip: int = 0, on_error: str = "raise"):
        self.files, self.b, self.rank, self.world = files, batch_size // world, rank, world
        self.seed, self.preprocess, self.skip, self.on_error = seed, preprocess, skip, on_error

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("streamed shards are read by one worker per rank (set train.workers to 0 or 1)")
        step, pending = 0, []
        while True:
            n_before = step
            for sample in stream(self.files, rank=self.rank, world=self.world, on_error=self.on_error):
                pending.append(sample)
                if len(pending) == self.b:
                    if step >= self.skip:
                        caps = [pick_caption(s.captions, self.seed, step, k) for k, s in enumerate(pending)]
                        yield Batch([-1] * self.b, torch.stack([self.preprocess(s.image) for s in pending]), caps)
                    step, pending = step + 1, []
            if step == n_before:
                raise DataError(f"the shards hold fewer than one batch of {self.b} pairs for rank {self.rank}")
