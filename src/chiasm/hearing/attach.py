"""Give a built or saved model ears: its own parts, plus a Whisper encoder and a fresh audio bridge."""

from __future__ import annotations

from dataclasses import replace

from chiasm.config import AudioConfig
from chiasm.model import VisionLanguageModel, _in_lm_dtype, hearing_parts


def attach_hearing(model: VisionLanguageModel, audio: AudioConfig) -> VisionLanguageModel:
    """The same encoder, bridge, LM and tokenizer (not copied) with an audio branch built from ``audio``.

    Training then aligns the new audio bridge with everything else frozen, as the first
    stage of a VLM aligns its visual bridge: what the model already sees and says is kept.
    """
    if model.audio_encoder is not None:
        raise ValueError("this model hears already; change [model.audio] of a new model instead")
    heard = VisionLanguageModel(replace(model.config, audio=audio), model.encoder, model.bridge, model.lm,
                                model.tokenizer, **hearing_parts(audio, model.base_lm.config.hidden_size))
    return _in_lm_dtype(heard.to(model.device))
