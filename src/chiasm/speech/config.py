"""Typed config of a speech run (TOML/JSON), read with chiasm's config builder.

Same conventions as :mod:`chiasm.config`: unknown keys and wrong types are refused with the
key named; the fully resolved copy is saved as ``RUN/config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from chiasm.config import ConfigError, read_config_file


@dataclass
class SpeechData:
    """One data set: a JSONL manifest or a folder of NAME.wav + NAME.txt; ``pocketsphinx`` names Debian's set."""

    name: str
    manifest: str
    language: str | None = None  # for samples whose record names none
    max_samples: int | None = None


@dataclass
class SpeechStage:
    """One training stage. ``mode``: full (all weights), frozen_encoder (decoder only) or lora."""

    name: str = "finetune"
    mode: Literal["full", "frozen_encoder", "lora"] = "frozen_encoder"
    lr: float = 1e-5
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_encoder: bool = False  # LoRA on the encoder too (then its outputs cannot be cached)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    spec_augment: bool = False  # time and frequency masks on the log-mel (SpecAugment, LD policy, no warping)
    noise_snr_db: float | None = None  # white noise at this SNR (dB) added to each training clip
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: at the stage's end only)


@dataclass
class SpeechRunConfig:
    output_dir: str
    model: str = "packaged:base"  # packaged:tiny.en / packaged:base, a CTranslate2 or transformers folder, a hub id
    task: Literal["transcribe", "translate"] = "transcribe"
    train: list[SpeechData] = field(default_factory=list)
    eval: list[SpeechData] = field(default_factory=list)
    stages: list[SpeechStage] = field(default_factory=list)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    eval_before: bool = True  # score the starting model too: the improvement is the number that matters
    num_beams: int = 1
    eval_batch_size: int = 8
    backend: str = "auto"


def load_speech_config(path: str | Path) -> SpeechRunConfig:
    cfg = read_config_file(path, SpeechRunConfig)
    problems = []
    if not cfg.stages and cfg.train:
        problems.append("train data given but no [[stages]]")
    if cfg.stages and not cfg.train:
        problems.append("[[stages]] given but no [[train]] data")
    for i, s in enumerate(cfg.stages):
        for key in ("lr", "epochs", "batch_size", "grad_accum"):
            if getattr(s, key) <= 0:
                problems.append(f"stages[{i}].{key}: must be > 0, got {getattr(s, key)}")
    if cfg.num_beams < 1:
        problems.append(f"num_beams: must be >= 1, got {cfg.num_beams}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return cfg
