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
from chiasm.data.sample import DataError
from chiasm.train.dist import barrier

log = logging.getLogger(__name__)


def _fingerprint(model, pairs: PairSet) -> str:
    key = json.dumps({"tower": to_dict(model.config.image), "pre": model.preprocessing.to_dict(),
                      "data": pairs.name, "n": len(pairs), "ids": [pairs.ids[0], pairs.ids[-1]]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def decode(pairs: PairSet, i: int, preprocess, bad: dict[int, str] | None) -> torch.Tensor | None:
    """Sample ``i``'s pixels; a failed decode raises (``bad`` is None) or is recorded in ``bad`` (skip)."""
    try:
        return preprocess(pairs.image(i))
    except DataError as exc:
        if bad is None:
            raise
        bad[i] = str(exc)
        return None


@torch.no_grad()
def locked_image_features(model, pairs: PairSet, cache_dir: Path, *, main: bool = True, batch_size: int = 256,
                          skip_bad: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """``(N, width)`` float32 pooled trunk outputs of every sample, memory-mapped from ``cache_dir``, and
    the samples whose image failed to decode (their rows are zeros; only with ``skip_bad``)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"image-{_fingerprint(model, pairs)}.npy"
    bad_file = path.with_suffix(".bad.json")
    if main and not path.exists():
        tower, pre = model.visual, model.preprocessing
        was_training = tower.training
        tower.eval()
        device = next(tower.parameters()).device
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(pairs), tower.width))
        bad: dict[int, str] = {}
        for lo in tqdm(range(0, len(pairs), batch_size), desc="locked image tower", unit="batch", leave=False):
            idx = range(lo, min(lo + batch_size, len(pairs)))
            pixels = {i: decode(pairs, i, pre, bad if skip_bad else None) for i in idx}
            good = [i for i in idx if pixels[i] is not None]
            out[lo: lo + len(idx)] = 0.0
            if good:
                feats = tower.trunk(torch.stack([pixels[i] for i in good]).to(device)).float().cpu().numpy()
                out[good] = feats
        out.flush()
        del out
        bad_file.write_text(json.dumps({str(k): v for k, v in bad.items()}))
        tmp.rename(path)
        tower.train(was_training)
        log.info("cached the locked image tower's features of %d samples in %s", len(pairs), path)
    barrier()
    bad = {int(k): v for k, v in json.loads(bad_file.read_text()).items()} if bad_file.is_file() else {}
    if bad and not skip_bad:
        first = next(iter(bad.values()))
        raise DataError(f"{len(bad)} images of the cached set failed to decode (cached with on_error = 'skip'); "
                        f"first: {first}")
    return np.load(path, mmap_mode="r"), bad


def pixel_cache(pairs: PairSet, preprocess, limit_gb: float, *, skip_bad: bool = False
                ) -> tuple[torch.Tensor | None, dict[int, str]]:
    """Every sample preprocessed once (float16), when that fits ``limit_gb``, else None (decode per
    batch); and the samples whose image failed to decode (only with ``skip_bad``; else the first raises)."""
    bad: dict[int, str] = {}
    if limit_gb <= 0:
        return None, bad
    start, first = 0, None
    while first is None and start < len(pairs):
        first = decode(pairs, start, preprocess, bad if skip_bad else None)
        start += 1
    if first is None:
        raise DataError(f"{pairs.name}: no image could be decoded")
    size_gb = len(pairs) * first.numel() * 2 / 1e9
    if size_gb > limit_gb:
        log.info("pixels of %d samples need %.1f GB > train.cache_pixels_gb: decoding per batch", len(pairs), size_gb)
        return None, bad
    cache = torch.zeros((len(pairs), *first.shape), dtype=torch.float16)
    cache[start - 1] = first
    for i in tqdm(range(start, len(pairs)), desc="preprocessing images", unit="img", leave=False, mininterval=1):
        x = decode(pairs, i, preprocess, bad if skip_bad else None)
        if x is not None:
            cache[i] = x
    return cache, bad
