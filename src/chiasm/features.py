"""Encoder features computed once per image and cached (memory + a safetensors file).

When a stage keeps the encoder frozen its output never changes, so recomputing it every
epoch would waste most of a CPU's time. The cache file is keyed by the encoder's config
and weights fingerprint and by the image list, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from chiasm.data.images import load_image
from chiasm.encoders.base import VisionEncoder
from chiasm.encoders.preprocessing import ImagePreprocessing

log = logging.getLogger(__name__)


def _fingerprint(encoder: VisionEncoder, paths: Sequence[str],
                 preprocess: Callable[[Image.Image], torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(type(encoder).__name__.encode())
    # The image -> pixels steps (size, crop, normalisation, padding) change the features too.
    if isinstance(preprocess, ImagePreprocessing):
        h.update(json.dumps(preprocess.to_dict(), sort_keys=True).encode())
    h.update(str(encoder.image_size).encode())
    # Options that change the features without changing the weights (feature layers, grid).
    h.update(f"{encoder.dim}|{encoder.grid()}|{getattr(encoder, 'cache_key', '')}".encode())
    # A cheap weights fingerprint: sums of a few tensors change whenever weights do.
    for name, t in list(encoder.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(f"{float(t.double().sum()):.10e}".encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """Maps image path -> row of a ``(n_images, N, Dv)`` tensor of frozen-encoder features."""

    def __init__(self, index: dict[str, int], features: torch.Tensor):
        self.index = index
        self.features = features

    def lookup(self, paths: Sequence[str]) -> torch.Tensor:
        rows = [self.index[str(p)] for p in paths]
        return self.features[rows].float() if rows else self.features[:0].float()

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: VisionEncoder, paths: Sequence[str], *, cache_dir: Path | None = None,
              batch_size: int = 32, show_progress: bool = True,
              preprocess: Callable[[Image.Image], torch.Tensor] | None = None) -> FeatureCache:
        """Compute (or load from ``cache_dir``) features of every unique path.

        ``preprocess`` turns an image into pixels (a processor's image steps); by default the encoder's own.
        """
        preprocess = preprocess or encoder.preprocessing
        unique = sorted({str(p) for p in paths})
        index = {p: i for i, p in enumerate(unique)}
        file = None
        if cache_dir is not None:
            file = Path(cache_dir) / f"features-{_fingerprint(encoder, unique, preprocess)}.safetensors"
            if file.exists():
                try:
                    return cls(index, load_file(str(file))["features"])
                except (OSError, SafetensorError, KeyError) as exc:  # a cache is derived: recompute it
                    log.warning("feature cache %s is unreadable (%s); computing the features again", file, exc)
        was_training = encoder.training
        encoder.eval()
        device = next(encoder.parameters()).device
        chunks = []
        for i in tqdm(range(0, len(unique), batch_size), desc="encoding images", unit="batch",
                      disable=not show_progress):
            batch = unique[i : i + batch_size]
            pixels = torch.stack([preprocess(load_image(Path(p))) for p in batch]).to(device)
            chunks.append(encoder(pixels).to(torch.float16).cpu())
        encoder.train(was_training)
        feats = torch.cat(chunks) if chunks else torch.zeros(0)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            save_file({"features": feats.contiguous()}, str(tmp), metadata={"paths": json.dumps(unique)})
            tmp.rename(file)
        return cls(index, feats)
