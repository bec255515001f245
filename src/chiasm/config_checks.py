"""Value checks of a run config, done before anything is built.

The dataclasses in :mod:`chiasm.config` check keys and types; this module checks values: a
learning rate of 0, a LoRA dropout of 1 or a NaN weight decay would otherwise surface minutes
later as a flat loss curve or an error deep inside PyTorch, after the model was loaded. Every
numeric field of every config dataclass has a rule in :data:`RULES` (a test enumerates the
fields, so a new field cannot go unchecked), and every problem found is reported at once: a
user fixes a config in one edit, not one error per run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chiasm.config import ConfigError, RunConfig, StageConfig
from chiasm.eval.retention import CHUNK_TOKENS


@dataclass(frozen=True)
class Rule:
    """A range a number must lie in, and how to say so."""

    ok: Callable[[float], bool]
    text: str


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low}")


POSITIVE = Rule(lambda v: v > 0, "must be > 0")
UNIT = Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")
DROPOUT = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
ANY = Rule(lambda v: True, "any value")  # e.g. a hidden-state index, which may count from the end

# (dataclass name, field name) -> rule. A None value passes wherever a field allows None: it
# means "the default" (the stage's lr, the LM's own length...), not a number.
RULES: dict[tuple[str, str], Rule] = {
    ("EncoderConfig", "feature_layer"): ANY,
    ("EncoderConfig", "image_size"): at_least(1),
    ("ModelConfig", "max_length"): at_least(1),
    ("AudioConfig", "seconds"): Rule(lambda v: 0 < v <= 30 and abs(v * 50 - round(v * 50)) < 1e-6,
                                     "must be a multiple of 0.02 in (0, 30] (Whisper's 20 ms frames, 30 s window)"),
    ("TilingConfig", "max_tiles"): at_least(1),
    ("TilingConfig", "min_tiles"): at_least(1),
    ("TilingConfig", "min_side"): at_least(1),
    ("TilingConfig", "max_image_pixels"): at_least(1),
    ("TilingConfig", "max_distortion"): at_least(1),
    ("PolicyConfig", "lr"): POSITIVE,
    ("PolicyConfig", "last_n"): at_least(1),
    ("PolicyConfig", "lora_r"): at_least(1),
    ("PolicyConfig", "lora_alpha"): POSITIVE,
    ("PolicyConfig", "lora_dropout"): DROPOUT,
    ("PolicyConfig", "lora_layers"): at_least(1),
    ("StageConfig", "epochs"): POSITIVE,
    ("StageConfig", "max_steps"): at_least(1),
    ("StageConfig", "batch_size"): at_least(1),
    ("StageConfig", "grad_accum"): at_least(1),
    ("StageConfig", "lr"): POSITIVE,
    ("StageConfig", "warmup_ratio"): UNIT,
    ("StageConfig", "min_lr_ratio"): UNIT,
    ("StageConfig", "weight_decay"): at_least(0),
    ("StageConfig", "grad_clip"): POSITIVE,
    ("StageConfig", "checkpoint_every"): at_least(0),
    ("StageConfig", "max_skip_fraction"): UNIT,
    ("StageConfig", "max_image_pixels"): at_least(1),
    ("StageConfig", "temperature"): POSITIVE,
    ("StageConfig", "phrase_span"): at_least(0),
    ("StageConfig", "region_weight"): at_least(0),
    ("StageConfig", "text_replay"): at_least(0),
    ("StageConfig", "replay_tokens"): at_least(1),
    ("StageConfig", "replay_pool"): at_least(1),
    ("StageConfig", "num_workers"): at_least(0),
    ("StageConfig", "group_by_length"): at_least(0),  # 0: off
    ("StageConfig", "pack_length"): at_least(0),  # 0: off
    ("StageConfig", "image_token_budget"): at_least(1),
    ("EvalConfig", "max_samples"): at_least(1),
    ("EvalConfig", "batch_size"): at_least(1),
    ("EvalConfig", "max_new_tokens"): at_least(1),
    ("EvalConfig", "retention_tokens"): at_least(CHUNK_TOKENS),  # one perplexity chunk at least
    ("EvalConfig", "retention_prompts"): at_least(1),
    ("RunConfig", "seed"): at_least(0),  # numpy and torch generators take non-negative seeds
}

# A stage name becomes a folder (RUN/stages/NAME): letters, digits, '.', '_' and '-', not only dots.
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


@functools.cache
def numeric_fields(cls: type) -> list[str]:
    """Fields of dataclass ``cls`` whose type is int or float (or either or None)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if any(m in (int, float) for m in members):
            out.append(f.name)
    return out


def value_problems(obj: Any, where: str = "") -> list[str]:
    """One line per numeric value of ``obj`` (a config dataclass, nested ones included) out of range."""
    problems = []
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            problems += value_problems(value, path)
        elif isinstance(value, list):
            problems += [p for i, v in enumerate(value) if dataclasses.is_dataclass(v)
                         for p in value_problems(v, f"{path}[{i}]")]
        elif f.name in numeric_fields(type(obj)) and value is not None:
            rule = RULES.get((type(obj).__name__, f.name))
            if rule is None:
                raise KeyError(f"no value rule for {type(obj).__name__}.{f.name}; add one to RULES")
            if isinstance(value, bool) or not isinstance(value, (int, float)):  # a config built in Python
                problems.append(f"{path}: must be a number, got {value!r}")
            elif isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{path}: must be a finite number, got {value}")
            elif not rule.ok(value):
                problems.append(f"{path}: {rule.text}, got {value}")
    return problems


def stage_problems(stages: list[StageConfig]) -> list[str]:
    """Recipe-level problems: no stages, unsafe or repeated names, settings that contradict each other."""
    if not stages:
        return ["stages: a run needs at least one stage ([[stages]] with name and data)"]
    problems, seen = [], {}
    for i, s in enumerate(stages):
        where = f"stages[{i}]"
        if not SAFE_NAME.fullmatch(s.name) or set(s.name) == {"."}:
            problems.append(f"{where}.name: {s.name!r} is not a safe folder name; use letters, digits, '.', '_', '-'")
        elif s.name in seen:
            problems.append(f"{where}.name: {s.name!r} is already the name of stages[{seen[s.name]}]")
        seen.setdefault(s.name, i)
        if not s.data.strip():
            problems.append(f"{where}.data: must name a data file, got ''")
        if s.text_replay > 0 and (s.objective != "lm" or s.lm.mode == "frozen"):
            problems.append(f"{where}.text_replay: set to {s.text_replay}, but text_replay keeps a trained LM's "
                            f"language; it needs objective 'lm' and an LM that trains (got objective "
                            f"{s.objective!r}, lm.mode {s.lm.mode!r})")
        if 0 < s.replay_pool < s.text_replay:
            problems.append(f"{where}.replay_pool: must hold one step's replay rows (text_replay = "
                            f"{s.text_replay}), got {s.replay_pool}")
    return problems


def raise_problems(problems: list[str], what: str = "config") -> None:
    """One ConfigError listing every problem, one per line; nothing when there are none."""
    if len(problems) == 1:
        raise ConfigError(f"{what}: {problems[0]}")
    if problems:
        raise ConfigError("\n".join([f"{what}: {len(problems)} problems:", *(f"  {p}" for p in problems)]))

def check_run_config(cfg: RunConfig, what: str = "config") -> None:
    """Raise one ConfigError naming every out-of-range value and recipe problem of ``cfg``."""
    from chiasm.options import check_model_options  # the registries behind it import chiasm.config

    problems = []
    try:
        check_model_options(cfg.model, "RunConfig.model")
    except ConfigError as exc:
        problems.append(str(exc))
    if not cfg.model.lm.source.strip():  # would reach the hub loader as an empty model id
        problems.append("model.lm.source: must name an LM folder, a hub id or packaged:NAME, got ''")
    raise_problems(problems + stage_problems(cfg.stages) + value_problems(cfg), what)


def check_values(obj: Any, what: str) -> None:
    """Value checks of one config dataclass on its own (e.g. an EvalConfig built from CLI options)."""
    raise_problems(value_problems(obj), what)
