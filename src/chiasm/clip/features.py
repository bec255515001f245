"""Computed once: a locked image trunk's pooled vectors (on disk, memory-mapped) and preprocessed pixels.

A locked (LiT) trunk gives the same vector for a sample at every visit, so training reads
it from ``RUN/cache`` instead of running the trunk: the expensive half of every step
disappears. The file is named by a fingerprint of the trunk's config, its preprocessing and
the samples, so a changed tower or data set never reads stale vectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chiasm.clip.pairs import PairSet
from chiasm.config import to_dict
from chiasm.train.dist import barrier

log = logging.getLogger(__name__)


def _fingerprint(model, pairs: PairSet) -> str:
    key = json.dumps({"tower": to_dict(model.config.image), "pre": model.preprocessing.to_dict(),
                      "data": pairs.name, "n": len(pairs), "ids": [pairs.ids[0], pairs.ids[-1]]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@torch.no_grad()
def locked_image_features(model, pairs: PairSet, cache_dir: Path, *, main: bool = True,
                          batch_size: int = 256) -> np.ndarray:
    """``(N, width)`` float32 pooled trunk outputs of every sample, memory-mapped from ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"image-{_fingerprint(model, pairs)}.npy"
    if main and not path.exists():
        tower, pre = model.visual, model.preprocessing
        was_training = tower.training
        tower.eval()
        device = next(tower.parameters()).device
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(pairs), tower.width))
        for lo in tqdm(range(0, len(pairs), batch_size), desc="locked image tower", unit="batch", leave=False):
            idx = range(lo, min(lo + batch_size, len(pairs)))
            pixels = torch.stack([pre(pairs.image(i)) for i in idx]).to(device)
            out[lo: lo + len(idx)] = tower.trunk(pixels).float().cpu().numpy()
        out.flush()
        del out
        tmp.rename(path)
        tower.train(was_training)
        log.info("cached the locked image tower's features of %d samples in %s", len(pairs), path)
    barrier()
    return np.load(path, mmap_mode="r")


def pixel_cache(pairs: PairSet, preprocess, limit_gb: float) -> torch.Tensor | None:
    """Every sample preprocessed once (float16), when that fits ``limit_gb``; else None (decode per batch)."""
    if limit_gb <= 0:
        return None
    first = preprocess(pairs.image(0))
    size_gb = len(pairs) * first.numel() * 2 / 1e9
    if size_gb > limit_gb:
        log.info("pixels of %d samples need %.1f GB > train.cache_pixels_gb: decoding per batch", len(pairs), size_gb)
        return None
    cache = torch.empty((len(pairs), *first.shape), dtype=torch.float16)
    cache[0] = first
    for i in tqdm(range(1, len(pairs)), desc="preprocessing images", unit="img", leave=False, mininterval=1):
        cache[i] = preprocess(pairs.image(i))
    return cache
