"""Small CLIP configs the CLIP tests share (seconds to train on digits)."""

from __future__ import annotations

from chiasm.clip.config import (
    ClipDataConfig,
    ClipModelConfig,
    ClipRunConfig,
    ClipTrainConfig,
    ImageTowerConfig,
    TextTowerConfig,
)


def tiny_config(out: str, *, steps: int = 4, batch: int = 16, loss: str = "clip", **train) -> ClipRunConfig:
    return ClipRunConfig(
        model=ClipModelConfig(image=ImageTowerConfig(image_size=8, patch_size=4, width=32, layers=1, head_width=16),
                              text=TextTowerConfig(width=32, layers=1, heads=2, context_length=12, vocab_size=200),
                              embed_dim=16, loss=loss),
        data=ClipDataConfig(kind="digits", limit=200),
        train=ClipTrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup=0, log_every=1, seed=3, **train),
        output_dir=out)
