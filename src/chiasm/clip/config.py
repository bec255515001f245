"""The CLIP run config: towers, loss, data, training and evaluation, read from TOML or JSON.

Parsed with chiasm's own config reader (unknown keys are errors; one resolved copy is saved
in every run folder, and ``--resume`` checks the saved copy against the new one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from chiasm.config import ConfigError, EncoderConfig, read_config_file


@dataclass
class ImageTowerConfig:
    """``vit``: a ViT from scratch (open_clip's layout); ``encoder``: any chiasm encoder, mean-pooled."""

    kind: Literal["vit", "encoder"] = "vit"
    image_size: int = 32
    patch_size: int = 4
    width: int = 128
    layers: int = 4
    head_width: int = 32
    mlp_ratio: float = 4.0
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    encoder: EncoderConfig | None = None  # kind = "encoder": which one (efficientnet-lite0, hf-vision, ...)
    locked: bool = False  # LiT: frozen, its pooled features computed once and cached


@dataclass
class TextTowerConfig:
    """``transformer``: from scratch with a tokenizer trained on the captions; ``hf``: a transformers encoder."""

    kind: Literal["transformer", "hf"] = "transformer"
    context_length: int = 32
    vocab_size: int = 2000  # the most tokens the trained tokenizer may have
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    source: str | None = None  # kind = "hf": a folder, a hub id, or "packaged:all-minilm-l6-v2"
    pool: Literal["mean", "cls"] = "mean"  # kind = "hf": how token states become one vector
    trust_remote_code: bool = False
    locked: bool = False
    too_long: Literal["truncate", "refuse"] = "truncate"  # captions past the context: cut (counted) or refuse


@dataclass
class ClipModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128
    loss: Literal["clip", "siglip"] = "clip"
    init_logit_scale: float | None = None  # log of the initial scale; None: log(1/0.07) (CLIP), log(10) (SigLIP)
    init_logit_bias: float | None = None  # SigLIP only; None: -10
    max_logit_scale: float = 100.0  # the scale is clamped to at most this (CLIP paper)


@dataclass
class ClipDataConfig:
    """Where image-caption pairs come from.

    ``llava``: a LLaVA JSON/JSONL (the caption is the first assistant turn); ``folder``: images +
    a captions file (``captions.jsonl`` or ``captions.tsv``); ``shards``: WebDataset-style tar
    shards (a glob or a folder), streamed; ``digits``, ``fashion-mnist``: labelled sets turned into
    captions with templates; ``synthetic``: chiasm's synthetic world and its captions.
    """

    kind: Literal["llava", "folder", "shards", "digits", "fashion-mnist", "synthetic"] = "digits"
    path: str | None = None
    image_root: str | None = None
    split: Literal["train", "test"] = "train"
    limit: int | None = None  # at most this many samples (the first ones, after the split)
    templates: list[str] | None = None  # labelled sets: caption templates ("a photo of a {}."); None: the defaults
    seed: int = 0
    on_error: Literal["raise", "skip"] = "raise"  # a bad image or caption: stop, or skip it and count it


@dataclass
class ClipTrainConfig:
    steps: int = 500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    min_lr_ratio: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    grad_checkpointing: bool = False
    backend: str = "auto"  # the process group's, under torchrun
    workers: int = 0  # DataLoader worker processes that decode and preprocess batches ahead
    cache_pixels_gb: float = 2.0  # preprocess a map-style set once into memory if it fits this (0: never)


@dataclass
class ClipEvalConfig:
    data: ClipDataConfig | None = None
    templates: list[str] | None = None  # zero-shot prompt templates; None: held-out defaults never used in training
    batch_size: int = 512


@dataclass
class ClipRunConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    eval: ClipEvalConfig = field(default_factory=ClipEvalConfig)
    output_dir: str = "runs/clip"


def load_clip_config(path: str | Path) -> ClipRunConfig:
    cfg = read_config_file(path, ClipRunConfig)
    check_clip_config(cfg, str(path))
    return cfg


def check_clip_config(cfg: ClipRunConfig, where: str = "config") -> None:
    """Values that parse but cannot work, refused before anything loads."""
    m, t = cfg.model, cfg.train
    problems = []
    if m.image.kind == "encoder" and m.image.encoder is None:
        problems.append("model.image.kind = 'encoder' needs [model.image.encoder] (name, options)")
    if m.image.kind == "vit" and m.image.image_size % m.image.patch_size:
        problems.append(f"model.image.image_size {m.image.image_size} is not divisible by patch_size "
                        f"{m.image.patch_size}")
    if m.image.kind == "vit" and m.image.width % m.image.head_width:
        problems.append(f"model.image.width {m.image.width} is not divisible by head_width {m.image.head_width}")
    if m.text.kind == "hf" and not m.text.source:
        problems.append("model.text.kind = 'hf' needs model.text.source (a folder, hub id or packaged:NAME)")
    if m.text.kind == "transformer" and m.text.width % m.text.heads:
        problems.append(f"model.text.width {m.text.width} is not divisible by heads {m.text.heads}")
    if m.image.locked and m.text.locked:
        problems.append("both towers are locked: nothing but the temperature would train")
    if t.batch_size < 2:
        problems.append(f"train.batch_size {t.batch_size}: a contrastive loss needs at least 2 pairs per batch")
    if t.steps < 1:
        problems.append(f"train.steps must be at least 1, got {t.steps}")
    if m.embed_dim < 1 or m.text.context_length < 3:
        problems.append("model.embed_dim must be >= 1 and model.text.context_length >= 3")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
