"""A run that starts from a saved model folder (``init_from``) instead of building one from [model].

A model imported from another format (``chiasm import``) or trained by an earlier run has no
sources to be rebuilt from: its weights are the folder. ``init_from`` names that folder; the
run's model config becomes the folder's own, so the run folder's ``config.json`` records the
model it trains and a resumed run is compared against it like any other.
"""

from __future__ import annotations

import json
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
    if cfg.model not in (ModelConfig(), model):  # [model] given, and not the folder's own (a resolved config.json)
        raise ConfigError(f"init_from: [model] differs from the model config in {file}; leave [model] out: the "
                          "folder brings its own")
    cfg.model = model


def start_model(cfg: RunConfig) -> VisionLanguageModel:
    """The model a run trains: the saved folder of ``init_from``, else built from ``cfg.model``."""
    if cfg.init_from is not None:
        return VisionLanguageModel.load(cfg.init_from)
    return VisionLanguageModel.build(cfg.model)
