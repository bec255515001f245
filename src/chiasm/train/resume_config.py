"""What a ``--resume`` may change in a run's config, and the record of what it did change.

A run folder's ``config.json`` is the config that produced its weights. Resuming with a
different config is refused where the weights so far could not have come from the new one
(another model, seed, data, policy or objective; a change to a stage already done; another
global batch per step), and allowed where the change acts from the resumed step on: more
steps or epochs, a new learning rate or schedule shape, checkpointing, data workers,
evaluation and output settings. Allowed changes are logged, appended to
``config_history.jsonl`` (time, stage, step, changes) and ``config.json`` becomes the new
effective config.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chiasm.config import ConfigError, RunConfig, save_config, to_dict
from chiasm.train.checkpoint import TrainState

log = logging.getLogger(__name__)

HISTORY = "config_history.jsonl"
# Run-level keys that shape no weight so far (where things go, how they are computed or evaluated).
RUN_SAFE = ("output_dir", "feature_cache", "precision", "strategy", "backend", "find_unused_parameters", "eval")
# Stage keys that change nothing a stage computes: allowed for every stage, also finished ones.
NO_EFFECT = ("checkpoint_every", "num_workers", "feature_cache")
# Stage keys that act from the resumed step on: allowed for the stage in progress.
FROM_NOW = ("lr", "encoder.lr", "bridge.lr", "lm.lr", "warmup_ratio", "min_lr_ratio", "weight_decay", "grad_clip",
            "max_steps", "epochs")
# Per-rank batch shape: allowed when the global batch of a step stays the same list of samples.
BATCH = ("batch_size", "grad_accum")


class ResumeConfigError(ConfigError):
    """A resumed run's config differs from the saved one where the weights so far depend on it."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


_ABSENT = object()


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[Change]:
    """Every leaf that differs, as ``key.path[i]`` -> (old, new); stages compare index by index."""
    changes: list[Change] = []
    for key in list(old) + [k for k in new if k not in old]:
        path = f"{prefix}{key}"
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += diff(a, b, path + ".")
        elif key == "stages" and not prefix and isinstance(a, list) and isinstance(b, list):
            for i in range(max(len(a), len(b))):
                sa = a[i] if i < len(a) else _ABSENT
                sb = b[i] if i < len(b) else _ABSENT
                if isinstance(sa, dict) and isinstance(sb, dict):
                    changes += diff(sa, sb, f"stages[{i}].")
                elif sa != sb:
                    changes.append(Change(f"stages[{i}]", sa, sb))
        elif a != b:
            changes.append(Change(path, a, b))
    return changes


def _refusal(change: Change, state: TrainState, new: dict[str, Any], world: int) -> str | None:
    """Why ``change`` cannot be made when resuming at ``state``; None when it can."""
    key = change.key
    top = key.split(".", 1)[0]
    if not key.startswith("stages["):
        return None if top in RUN_SAFE else "the weights so far depend on it"
    index = int(key[len("stages["):key.index("]")])
    rest = key[key.index("]") + 2:] if "]." in key else ""
    done = index < state.stage_index or (index == state.stage_index and state.stage_done)
    if index > state.stage_index:
        return None  # a stage that has not started yet
    if not rest:
        return "a stage that has started cannot be removed or replaced"
    if rest in NO_EFFECT:
        return None
    if done:
        return "this stage is finished; a change to it would not be trained"
    if rest in FROM_NOW:
        if rest == "max_steps" and change.new is not None and change.new < state.step:
            return f"the stage is already at step {state.step}"
        return None
    if rest in BATCH:
        stage = new["stages"][index]
        if stage.get("group_by_length"):
            return "group_by_length sorts within each micro-batch, so the batch shape decides the samples"
        return None  # the global batch size is checked for the stage as a whole
    return "the weights so far depend on it"


def _global_batch(stage: dict[str, Any], world: int) -> int:
    return stage["batch_size"] * stage["grad_accum"] * world


def check_resume(saved: dict[str, Any], cfg: RunConfig, state: TrainState, world: int,
                 where: Path) -> list[Change]:
    """The allowed changes from ``saved`` (the run folder's config.json) to ``cfg``; refuse the rest.

    One :class:`ResumeConfigError` lists every refused change (key: old -> new, and why),
    naming the run folder, before anything trains.
    """
    new = json.loads(json.dumps(to_dict(cfg)))
    changes = diff(saved, new)
    problems = [f"  {c} ({why})" for c in changes if (why := _refusal(c, state, new, world))]
    i = state.stage_index
    saved_world = state.world or world
    old_stages, new_stages = saved.get("stages", []), new["stages"]
    if not state.stage_done and i < len(old_stages) and i < len(new_stages):
        before, after = _global_batch(old_stages[i], saved_world), _global_batch(new_stages[i], world)
        if before != after:
            problems.append(f"  stages[{i}] global batch (batch_size x grad_accum x processes): {before} -> {after} "
                            f"({saved_world} -> {world} processes): each step would see other samples")
    if problems:
        raise ResumeConfigError(f"{where}: cannot resume with this config; it differs from the run's "
                                f"config.json where the weights so far depend on it:\n" + "\n".join(problems)
                                + "\nresume with the saved config (changing only steps, lr, checkpointing, workers "
                                "or eval), or start a new run in another output_dir")
    return changes


def resume_run_config(cfg: RunConfig, run_dir: Path, state: TrainState, world: int) -> list[Change]:
    """Check ``cfg`` against ``run_dir/config.json`` at ``state``: the allowed changes, or the refusal.

    Every rank calls this and reads the saved file before the writing rank records anything
    (:func:`record_resume`). A run folder without ``config.json`` (written by an older
    version) cannot be compared: a warning says so and the current config is recorded.
    """
    saved_file = Path(run_dir) / "config.json"
    if not saved_file.is_file():
        log.warning("%s has no config.json to compare the resumed config with; writing the current one", run_dir)
        return []
    try:
        saved = json.loads(saved_file.read_text())
    except ValueError as exc:
        raise ConfigError(f"{saved_file}: unreadable ({exc}); restore it to resume this run") from None
    return check_resume(saved, cfg, state, world, Path(run_dir))


def record_resume(cfg: RunConfig, run_dir: Path, state: TrainState, changes: list[Change]) -> None:
    """Log the changes, append them to ``config_history.jsonl`` and make ``cfg`` the run's ``config.json``."""
    run_dir = Path(run_dir)
    if changes:
        names = [s.name for s in cfg.stages]
        where = f"stage {names[state.stage_index]} step {state.step}" if state.stage_index < len(names) else \
            f"step {state.step}"
        for c in changes:
            log.warning("resume: %s %s -> %s from %s", c.key, _show(c.old), _show(c.new), where)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stage_index": state.stage_index,
                 "step": state.step, "changes": [{"key": c.key, "old": None if c.old is _ABSENT else c.old,
                                                  "new": None if c.new is _ABSENT else c.new} for c in changes]}
        with (run_dir / HISTORY).open("a") as f:
            f.write(json.dumps(entry) + "\n")
    if changes or not (run_dir / "config.json").is_file():
        save_config(cfg, run_dir / "config.json")


def record_fresh_start(cfg: RunConfig, run_dir: Path) -> None:
    """A run that starts over: ``cfg`` is its ``config.json``, and an earlier run's history goes."""
    (Path(run_dir) / HISTORY).unlink(missing_ok=True)
    save_config(cfg, Path(run_dir) / "config.json")
