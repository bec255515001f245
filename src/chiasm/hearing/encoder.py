"""A Whisper encoder over a fixed window: log-mel ``(B, n_mels, 100 * seconds)`` -> frames ``(B, T, d)``.

Whisper's encoder was trained on 30 s windows (1,500 frames). A shorter window (a spoken
question lasts a few seconds) keeps the first ``50 * seconds`` position embeddings, as
whisper.cpp's ``audio_ctx`` does: the cost falls with the window, the frames that carry
speech are computed the same way, and a bridge trained on them learns what they mean.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from chiasm.errors import ModelFolderError
from chiasm.hearing.preprocessing import AudioPreprocessing

FRAMES_PER_SECOND = 50  # after the encoder's stride-2 convolution over 100 mel frames per second
CONFIG_FOLDER = "audio"  # in a model folder: the encoder's WhisperConfig and feature extractor
WEIGHTS_FILE = "audio_encoder.safetensors"


def window_frames(seconds: float, full: int) -> int:
    """Encoder frames of a ``seconds`` window; a window Whisper's positions cannot cover is refused."""
    frames = seconds * FRAMES_PER_SECOND
    if seconds <= 0 or abs(frames - round(frames)) > 1e-6 or round(frames) > full:
        raise ValueError(f"audio window of {seconds!r} s: give a multiple of 0.02 s between 0.02 and "
                         f"{full / FRAMES_PER_SECOND:g} s (the encoder's {full} positions)")
    return round(frames)


class AudioEncoder(nn.Module):
    """The encoder half of a Whisper, frozen, with the preprocessing its features need."""

    grid_kind = "20 ms audio frame"

    def __init__(self, encoder: WhisperEncoder, preprocessing: AudioPreprocessing):
        super().__init__()
        self.encoder = encoder
        self.preprocessing = preprocessing
        self.dim = int(encoder.config.d_model)
        self.frames = int(encoder.config.max_source_positions)
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_whisper(cls, source: str, seconds: float) -> AudioEncoder:
        """The encoder of a Whisper (packaged name, CTranslate2 or transformers folder, hub id), cut to ``seconds``."""
        from chiasm.speech.loader import load_whisper

        w = load_whisper(source)
        full = w.model.model.encoder
        frames = window_frames(seconds, int(full.config.max_source_positions))
        config = copy.deepcopy(w.model.config)
        config.max_source_positions = frames
        encoder = WhisperEncoder(config)
        state = full.state_dict()
        state["embed_positions.weight"] = state["embed_positions.weight"][:frames]
        encoder.load_state_dict(state)
        return cls(encoder.eval(), AudioPreprocessing(seconds, w.features))

    def grid(self) -> tuple[int, int]:
        """One row of frames: bridges pool or resample along time."""
        return 1, self.frames

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``(B, n_mels, 2 * frames)`` -> ``(B, frames, dim)``; no gradient while frozen."""
        frozen = not any(p.requires_grad for p in self.parameters())
        with torch.no_grad() if frozen else torch.enable_grad():
            return self.encoder(mel.to(self.encoder.conv1.weight.dtype)).last_hidden_state

    def save(self, folder: Path) -> None:
        """The WhisperConfig (window included), the feature extractor and the weights."""
        (folder / CONFIG_FOLDER).mkdir(parents=True, exist_ok=True)
        self.encoder.config.save_pretrained(folder / CONFIG_FOLDER)
        self.preprocessing.extractor.save_pretrained(folder / CONFIG_FOLDER)
        save_file({k: v.detach().contiguous() for k, v in self.encoder.state_dict().items()},
                  str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: Path, seconds: float) -> AudioEncoder:
        try:
            config = WhisperConfig.from_pretrained(folder / CONFIG_FOLDER)
            extractor = WhisperFeatureExtractor.from_pretrained(folder / CONFIG_FOLDER)
            state = load_file(str(folder / WEIGHTS_FILE))
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"{folder}: cannot read the audio encoder ({CONFIG_FOLDER}/, {WEIGHTS_FILE}): "
                                   f"{exc}") from exc
        if int(config.max_source_positions) != window_frames(seconds, int(config.max_source_positions)):
            raise ModelFolderError(f"{folder / CONFIG_FOLDER}: a {config.max_source_positions}-frame window, but the "
                                   f"model config says {seconds:g} s")
        encoder = WhisperEncoder(config)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelFolderError(f"{folder / WEIGHTS_FILE}: does not fit {CONFIG_FOLDER}/config.json "
                                   f"({' '.join(str(exc).split())[:300]})") from exc
        return cls(encoder.eval(), AudioPreprocessing(seconds, extractor))
