"""A run that starts from a saved model folder (``init_from``) instead of building one from [model].

Beside ``init_from``, a config may give ``[model.audio]`` alone: the saved model (one that
does not hear yet) gets a Whisper encoder and a fresh audio bridge (chiasm.hearing.attach).

A model imported from another format (``chiasm import``) or trained by an earlier run has no
sources to be rebuilt from: its weights are the folder. ``init_from`` names that folder; the
run's model config becomes the folder's own, so the run folder's ``config.json`` records the
model it trains and a resumed run is compared against it like any other.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from chiasm.config import ConfigError, ModelConfig, RunConfig, from_dict
from chiasm.model import CONFIG_FILE, VisionLanguageModel
from chiasm.model_folder_checks import check_saved_config


def resolve_init_from(cfg: RunConfig) -> None:
    """Put the model config of the folder ``cfg.init_from`` names into ``cfg.model`` (nothing without one)."""
    if cfg.init_from is None:
        return
    file = Path(cfg.init_from) / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"init_from: {cfg.init_from} is not a chiasm model folder (no {CONFIG_FILE})")
    try:
        model = from_dict(ModelConfig, json.loads(file.read_text()))
    except ValueError as exc:
        raise ConfigError(f"init_from: {file}: not a valid model config: {exc}") from None
    check_saved_config(model, file)
    ears = cfg.model.audio if model.audio is None else None  # [model.audio] alone: give the saved model ears
    if cfg.model not in (ModelConfig(), model, replace(ModelConfig(), audio=ears)):
        raise ConfigError(f"init_from: [model] differs from the model config in {file}; leave [model] out: the "
                          "folder brings its own (only [model.audio] may be added, to a model that does not hear)")
    cfg.model = replace(model, audio=ears) if ears is not None else model


def start_model(cfg: RunConfig) -> VisionLanguageModel:
    """The model a run trains: the saved folder of ``init_from``, else built from ``cfg.model``."""
    if cfg.init_from is not None:
        model = VisionLanguageModel.load(cfg.init_from)
        if cfg.model.audio is not None and model.audio_encoder is None:
            from chiasm.hearing.attach import attach_hearing

            model = attach_hearing(model, cfg.model.audio)  # a fresh audio bridge for the stages to align
        return model
    return VisionLanguageModel.build(cfg.model)
