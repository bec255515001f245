"""A :class:`ClipDataConfig` -> the pairs it names (map-style) or the shard files to stream."""

from __future__ import annotations

from pathlib import Path

from chiasm.clip.config import ClipDataConfig
from chiasm.clip.labelled import (
    TRAIN_TEMPLATES,
    check_templates,
    digits_pairs,
    fashion_pairs,
    synthetic_pairs,
)
from chiasm.clip.pairs import PairSet, folder_pairs, llava_pairs
from chiasm.clip.shards import shard_files


def build_pairs(cfg: ClipDataConfig) -> PairSet:
    """Map-style pairs for every kind but ``shards`` (those stream: :func:`build_shards`)."""
    templates = check_templates(cfg.templates or list(TRAIN_TEMPLATES), "data.templates")
    if cfg.kind == "digits":
        pairs = digits_pairs(cfg.split, templates, cfg.seed)
    elif cfg.kind == "fashion-mnist":
        pairs = fashion_pairs(cfg.split, templates, cfg.path)
    elif cfg.kind == "synthetic":
        n = cfg.limit or 2000
        # Rendered at the world's own size (224 px): the tower's preprocessing resizes, as it will for
        # the world's image files when the tower serves a VLM.
        pairs = synthetic_pairs(n, cfg.seed + (1_000_003 if cfg.split == "test" else 0))
    elif cfg.kind in ("llava", "folder"):
        if not cfg.path:
            raise ValueError(f"data.kind = {cfg.kind!r} needs data.path")
        if not Path(cfg.path).exists():
            raise FileNotFoundError(f"data.path {cfg.path}: no such file or folder")
        pairs = llava_pairs(cfg.path, cfg.image_root, cfg.on_error) if cfg.kind == "llava" \
            else folder_pairs(cfg.path, cfg.on_error)
    else:
        raise ValueError("data.kind = 'shards' streams; use build_shards")
    if cfg.limit is not None and cfg.limit < len(pairs):
        ids, keep = pairs.ids[: cfg.limit], cfg.limit
        pairs = PairSet(pairs.name, ids, pairs.load, pairs.texts,
                        labels=pairs.labels[:keep] if pairs.labels is not None else None,
                        classes=pairs.classes, skipped=pairs.skipped)
    if len(pairs) == 0:
        raise ValueError(f"data {cfg.kind} {cfg.path or ''}: no usable pairs")
    return pairs


def build_shards(cfg: ClipDataConfig) -> list[Path]:
    if not cfg.path:
        raise ValueError("data.kind = 'shards' needs data.path (a folder of .tar shards or a glob)")
    return shard_files(cfg.path)
