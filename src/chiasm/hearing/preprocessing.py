"""Audio -> the log-mel window one audio encoder takes, saved with the model like image preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from chiasm.data.sample import DataError
from chiasm.speech.audio import SAMPLE_RATE, load_audio


@dataclass
class AudioPreprocessing:
    """16 kHz mono samples -> ``(n_mels, seconds * 100)`` log-mel features, padded with silence.

    ``seconds`` is the encoder's window. A longer clip is refused, never cut: a question whose
    end is dropped is a different question.
    """

    seconds: float
    extractor: WhisperFeatureExtractor

    @property
    def n_samples(self) -> int:
        return round(self.seconds * SAMPLE_RATE)

    def __call__(self, audio: np.ndarray, name: str = "audio") -> torch.Tensor:
        if audio.ndim != 1 or audio.size == 0:
            raise DataError(f"{name}: expected non-empty mono audio, got shape {tuple(audio.shape)}")
        if audio.size > self.n_samples:
            raise DataError(f"{name}: {audio.size / SAMPLE_RATE:.2f} s of audio; this model hears at most "
                            f"{self.seconds:g} s per clip (audio is never cut: split it into several clips)")
        out = self.extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="max_length",
                             max_length=self.n_samples, truncation=False)
        return out["input_features"][0]

    def load(self, path: str | Path) -> torch.Tensor:
        """A file -> features; unreadable, empty or too long audio is a DataError naming the file."""
        return self(load_audio(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "extractor": self.extractor.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioPreprocessing:
        extractor = dict(data["extractor"])
        extractor.pop("feature_extractor_type", None)
        return cls(float(data["seconds"]), WhisperFeatureExtractor(**extractor))
