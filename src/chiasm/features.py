"""Encoder features computed once per image and cached (memory + a safetensors file).

When a stage keeps the encoder frozen its output never changes, so recomputing it every
epoch would waste most of a CPU's time. The cache file is keyed by the encoder's config
and weights fingerprint and by the image list, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from chiasm.data.images import load_image
from chiasm.data.sample import DataError
from chiasm.encoders.base import VisionEncoder
from chiasm.encoders.preprocessing import ImagePreprocessing


def _fingerprint(encoder: VisionEncoder, paths: Sequence[str],
                 preprocess: Callable[[Image.Image], torch.Tensor], max_pixels: int | None = None) -> str:
    h = hashlib.sha256()
    h.update(type(encoder).__name__.encode())
    if max_pixels is not None:  # which images were refused as too large depends on it
        h.update(f"max_pixels={max_pixels}".encode())
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
        try:
            st = Path(p).stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:  # missing or unreachable: refused at build, and a later fix changes the key
            h.update(f"{p}|missing".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """Maps image path -> row of a ``(n_images, N, Dv)`` tensor of frozen-encoder features.

    ``bad`` maps each image refused while building (with ``on_error="skip"``) to the reason,
    so a stage can drop the samples that use them before its first step.
    """

    def __init__(self, index: dict[str, int], features: torch.Tensor, bad: dict[str, str] | None = None):
        self.index = index
        self.features = features
        self.bad = bad or {}

    def lookup(self, paths: Sequence[str]) -> torch.Tensor:
        rows = []
        for p in paths:
            if str(p) not in self.index:
                why = self.bad.get(str(p))
                raise DataError(f"image {p} has no cached features"
                                + (f" (refused when the cache was built: {why})" if why else ""), image=str(p))
            rows.append(self.index[str(p)])
        return self.features[rows].float() if rows else self.features[:0].float()

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: VisionEncoder, paths: Sequence[str], *, cache_dir: Path | None = None,
              batch_size: int = 32, show_progress: bool = True,
              preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
              owners: Mapping[str, tuple[str, str]] | None = None, on_error: str = "raise",
              max_pixels: int | None = None) -> FeatureCache:
        """Compute (or load from ``cache_dir``) features of every unique path.

        ``preprocess`` turns an image into pixels (a processor's image steps); by default the encoder's own.
        ``owners`` maps a path to the ``(sample id, data file)`` of a sample that uses it, so that a
        broken image is reported with both. With ``on_error="skip"`` broken images are left out
        and listed in :attr:`bad` instead of raising: the build sees every image once, so a stage
        with a frozen encoder knows all its bad images before training starts.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        preprocess = preprocess or encoder.preprocessing
        owners = owners or {}
        wanted = sorted({str(p) for p in paths})
        file = None
        if cache_dir is not None:
            key = _fingerprint(encoder, wanted, preprocess, max_pixels)
            file = Path(cache_dir) / f"features-{key}.safetensors"
            if file.exists():
                with safe_open(str(file), framework="pt") as f:
                    meta = f.metadata() or {}
                kept = json.loads(meta["paths"]) if "paths" in meta else wanted
                bad = json.loads(meta.get("bad", "{}"))
                if bad and on_error != "skip":
                    first = next(iter(bad))
                    sid, src = owners.get(first, (None, None))
                    raise DataError(bad[first], sample_id=sid, source=src, image=first)
                return cls({p: i for i, p in enumerate(kept)}, load_file(str(file))["features"], bad)
        was_training = encoder.training
        encoder.eval()
        device = next(encoder.parameters()).device
        chunks, kept, bad = [], [], {}
        for i in tqdm(range(0, len(wanted), batch_size), desc="encoding images", unit="batch",
                      disable=not show_progress):
            pixels = []
            for p in wanted[i : i + batch_size]:
                sid, src = owners.get(p, (None, None))
                try:
                    pixels.append(preprocess(load_image(Path(p), sample_id=sid, source=src, max_pixels=max_pixels)))
                except DataError as exc:
                    if on_error != "skip":
                        raise
                    bad[p] = str(exc)
                    continue
                kept.append(p)
            if pixels:
                chunks.append(encoder(torch.stack(pixels).to(device)).to(torch.float16).cpu())
        encoder.train(was_training)
        feats = torch.cat(chunks) if chunks else torch.zeros(0)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            save_file({"features": feats.contiguous()}, str(tmp),
                      metadata={"paths": json.dumps(kept), "bad": json.dumps(bad)})
            tmp.rename(file)
        return cls({p: i for i, p in enumerate(kept)}, feats, bad)
