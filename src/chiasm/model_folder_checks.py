"""Checks of a saved model's config, done before any of its weights load.

A saved ``chiasm_config.json`` is a file people edit (a longer ``max_length``, another layout);
a value out of range or a name no registry knows would otherwise fail later, deep in a forward
pass or as an unknown-name error that does not say which file holds the name.
"""

from __future__ import annotations

from pathlib import Path

from chiasm.config import ConfigError, ModelConfig
from chiasm.errors import ModelFolderError


def check_saved_config(config: ModelConfig, file: Path) -> None:
    """Raise a ModelFolderError naming ``file`` for each out-of-range value or unknown encoder/bridge name."""
    from chiasm.config_checks import value_problems  # these import modules that import chiasm.model
    from chiasm.options import check_model_options

    problems = value_problems(config)
    try:
        check_model_options(config, "model")
    except ConfigError as exc:
        problems.append(str(exc))
    if problems:
        raise ModelFolderError(f"{file}: {'; '.join(problems)}")
