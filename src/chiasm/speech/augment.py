"""Training-time augmentation: white noise at a given SNR (waveform) and SpecAugment masks (log-mel).

SpecAugment (Park et al. 2019), the LD policy without time warping: two frequency masks of
up to 27 mel bins and time masks of up to 5% of the *speech* frames each (Whisper pads every
clip to 30 s; masking the padding teaches nothing). Masked values become the clip's mean.
"""

from __future__ import annotations

import numpy as np
import torch


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``audio`` plus white noise whose power is ``snr_db`` below the clip's."""
    power = float(np.mean(audio.astype(np.float64) ** 2)) or 1e-10
    noise = rng.standard_normal(len(audio)) * np.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def spec_augment(feats: torch.Tensor, speech_frames: list[int], generator: torch.Generator, *,
                 freq_masks: int = 2, max_freq: int = 27, time_masks: int = 2,
                 max_time_frac: float = 0.05) -> torch.Tensor:
    """A masked copy of log-mel ``feats`` (B, n_mels, frames); masks fall within each clip's speech."""
    out = feats.clone()
    n_mels = feats.shape[1]
    for b in range(feats.shape[0]):
        fill = out[b].mean()
        for _ in range(freq_masks):
            width = int(torch.randint(0, max_freq + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, n_mels - width), (1,), generator=generator))
            out[b, start : start + width, :] = fill
        frames = max(1, min(speech_frames[b], feats.shape[2]))
        for _ in range(time_masks):
            width = int(torch.randint(0, int(max_time_frac * frames) + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, frames - width), (1,), generator=generator))
            out[b, :, start : start + width] = fill
    return out
