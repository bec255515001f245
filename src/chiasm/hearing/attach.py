"""Give a built or saved model ears: its own parts, plus a Whisper encoder and a fresh audio bridge."""

from __future__ import annotations

from dataclasses import replace

from chiasm.bridges.base import build_bridge
from chiasm.config import AudioConfig
from chiasm.hearing.encoder import AudioEncoder
from chiasm.model import VisionLanguageModel, _in_lm_dtype


def attach_hearing(model: VisionLanguageModel, audio: AudioConfig) -> VisionLanguageModel:
    """The same encoder, bridge, LM and tokenizer (not copied) with an audio branch built from ``audio``.

    Training then aligns the new audio bridge with everything else frozen, as the first
    stage of a VLM aligns its visual bridge: what the model already sees and says is kept.
    """
    if model.audio_encoder is not None:
        raise ValueError("this model hears already; change [model.audio] of a new model instead")
    encoder = AudioEncoder.from_whisper(audio.source, audio.seconds)
    bridge = build_bridge(audio.bridge, encoder.dim, model.base_lm.config.hidden_size)
    heard = VisionLanguageModel(replace(model.config, audio=audio), model.encoder, model.bridge, model.lm,
                                model.tokenizer, audio_encoder=encoder, audio_bridge=bridge)
    return _in_lm_dtype(heard.to(model.device))
