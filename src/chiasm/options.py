"""Encoder and bridge ``options`` checked like every other config key.

Options are free-form tables in the config file, so nothing in the dataclass machinery sees
a misspelt ``hiden = 48``: without this check it would raise deep inside a constructor or,
worse, be ignored and leave a default in place. Each implementation declares what it
accepts: a bridge through its constructor's keyword arguments, an encoder through its
``OPTIONS`` table (name -> type). Values are checked against those types with the same
rules as the rest of the config.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from chiasm.config import ConfigError, ModelConfig, coerce


def option_types(cls: type, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword parameters of ``cls``'s constructor and their type hints (``Any`` where unannotated)."""
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = hints.get(name, Any)
    return out


def check_options(kind: str, name: str, options: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """Options with their values coerced; a ConfigError naming every unknown or mistyped one."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{kind} {name!r}: bad options {options}: unknown option(s) {unknown}; "
                          f"allowed: {sorted(allowed) or 'none'}")
    return {k: coerce(allowed[k], v, f"{kind} {name!r} option {k!r}") for k, v in options.items()}


def bridge_option_types(name: str) -> dict[str, Any]:
    import chiasm.bridges  # noqa: F401  (registration)
    from chiasm.bridges.base import BRIDGES

    return option_types(BRIDGES.get(name), skip=("vision_dim", "lm_dim"))


def encoder_option_types(name: str) -> dict[str, Any]:
    import chiasm.encoders  # noqa: F401  (registration)
    from chiasm.encoders.base import ENCODERS

    return ENCODERS.get(name).option_types()


def check_model_options(cfg: ModelConfig, where: str = "model") -> None:
    """Check the encoder's and the bridge's options of a model config (raises ConfigError)."""
    try:
        enc_types, bridge_types = encoder_option_types(cfg.encoder.name), bridge_option_types(cfg.bridge.name)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None
    check_options("encoder", cfg.encoder.name, cfg.encoder.options, enc_types)
    check_options("bridge", cfg.bridge.name, cfg.bridge.options, bridge_types)
    if cfg.audio is not None:
        try:
            audio_types = bridge_option_types(cfg.audio.bridge.name)
        except KeyError as exc:
            raise ConfigError(f"{where}.audio: {exc.args[0]}") from None
        check_options("audio bridge", cfg.audio.bridge.name, cfg.audio.bridge.options, audio_types)
