"""The diffusion run config: data, schedule, network, training, latent stage, evaluation.

Read from TOML with chiasm's config machinery (unknown keys are errors; the resolved copy is
saved as ``config.json`` in the run folder and in the model folder, which sampling reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chiasm.config import ConfigError, read_config_file
from chiasm.diffusion.data import SOURCES
from chiasm.diffusion.network import NetConfig
from chiasm.diffusion.schedule import ScheduleConfig
from chiasm.diffusion.vae import VAEConfig


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # fashion-mnist | digits | folder | synthetic
    root: str | None = None  # the folder for "folder"; another Fashion-MNIST location
    size: int = 28  # side in pixels (folder and synthetic images are resized / drawn at it)
    channels: int = 1
    n_train: int | None = None  # cap on training images (None: all)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    # Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper): None is the plain MSE.
    min_snr_gamma: float | None = None
    checkpoint_every: int = 200
    log_every: int = 20
    seed: int = 0
    backend: str = "auto"  # under torchrun: gloo on CPU, NCCL with GPUs


@dataclass
class LatentConfig:
    enabled: bool = False
    vae: VAEConfig = field(default_factory=VAEConfig)
    # A trained VAE to reuse instead of training one: a vae.safetensors file, or a run or model
    # folder holding one (of the same [latent.vae] shape). Stable Diffusion trains its autoencoder
    # once and every diffusion model after reuses it; so can runs that compare UNets here.
    vae_from: str | None = None


@dataclass
class DiffusionConfig:
    output_dir: str = "runs/diffusion"
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    text_tower: str = "packaged:all-minilm-l6-v2"
    text_max_tokens: int = 16


def check(cfg: DiffusionConfig, where: str) -> DiffusionConfig:
    """Every problem in one error, before any data or model is touched."""
    problems = []
    if cfg.data.source not in SOURCES:
        problems.append(f"data.source: {cfg.data.source!r} is not one of {list(SOURCES)}")
    if cfg.data.channels not in (1, 3):
        problems.append(f"data.channels: must be 1 or 3, got {cfg.data.channels}")
    if not 0 <= cfg.net.cond_dropout < 1:
        problems.append(f"net.cond_dropout: must be in [0, 1), got {cfg.net.cond_dropout}")
    if cfg.net.conditioning == "text" and cfg.data.source != "synthetic":
        problems.append("net.conditioning = 'text' needs captions: data.source = 'synthetic'")
    if cfg.latent.vae_from is not None and not cfg.latent.enabled:
        problems.append("latent.vae_from: set latent.enabled = true to use a VAE")
    if cfg.net.text_pooled and cfg.net.conditioning != "text":
        problems.append("net.text_pooled: a pooled prompt embedding needs net.conditioning = 'text'")
    levels = cfg.net.text_levels
    if levels is not None:
        if cfg.net.conditioning != "text":
            problems.append("net.text_levels: cross-attention to a prompt needs net.conditioning = 'text'")
        bad = [i for i in levels if not 0 <= i < len(cfg.net.channels)]
        if bad or len(set(levels)) != len(levels):
            problems.append(f"net.text_levels: {levels} must be distinct levels in 0..{len(cfg.net.channels) - 1} "
                            f"(one per entry of net.channels, 0 = the top)")
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg.train, name) < 1:
            problems.append(f"train.{name}: must be at least 1")
    if cfg.train.min_snr_gamma is not None and cfg.train.min_snr_gamma <= 0:
        problems.append(f"train.min_snr_gamma: must be positive, got {cfg.train.min_snr_gamma}")
    if cfg.train.lr <= 0:
        problems.append("train.lr: must be positive")
    if cfg.schedule.train_steps < 2:
        problems.append("schedule.train_steps: must be at least 2")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return cfg


def load_diffusion_config(path: str | Path) -> DiffusionConfig:
    return check(read_config_file(path, DiffusionConfig), str(path))
