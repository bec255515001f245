"""Full-state checkpoints without pickles: weights, optimizer, schedule position, RNG, data position.

Layout of ``RUN/checkpoint/``: ``model.safetensors`` (every parameter some stage so far
has trained), ``optimizer.safetensors`` + ``optimizer.json`` (tensor and scalar parts of
the optimizer state), ``rng.safetensors`` (the CPU RNG, and each CUDA device's where CUDA
is used) and ``state.json`` (stage index, optimizer step, python RNG). The step number fixes
the data position, since batches are a pure function of (seed, stage, epoch, step). Writes
go to a temporary folder renamed into place (:func:`save_checkpoint` says in which order), so
a run killed at any instant of a save keeps the previous checkpoint or the new one. Under
FSDP every rank joins in gathering whole tensors (:func:`gather_state`) and rank 0
writes the same layout as one process does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chiasm.errors import ModelFolderError
from chiasm.model import VisionLanguageModel

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    stage_index: int
    step: int
    stage_done: bool
    world: int | None = None  # processes that trained it (None: a checkpoint that did not record it)


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars["state"].setdefault(str(idx), {})[k] = v
    return tensors, scalars


def _join_optimizer(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for idx, st in scalars["state"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": scalars["param_groups"]}


def gather_state(model: VisionLanguageModel, trained: set[str],
                 optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trained parameters and the optimizer state, as whole tensors.

    Sharded (FSDP) tensors are gathered, one at a time onto the CPU: a collective, so every
    rank calls this in step. Plain tensors pass through untouched.
    """
    params = {k: v for k, v in model.state_dict().items() if k in trained}
    if not _sharded(optimizer):
        return params, optimizer.state_dict()
    from chiasm.train.fsdp import full_optimizer_state, full_tensors

    return full_tensors(params), full_optimizer_state(optimizer)


def cuda_rng_state() -> dict[str, torch.Tensor]:
    """Every CUDA device's generator state, stacked, where CUDA is in use; nothing without it."""
    if not torch.cuda.is_available():
        return {}
    return {"cuda": torch.stack([s.cpu() for s in torch.cuda.get_rng_state_all()])}


def restore_cuda_rng(rng: dict[str, torch.Tensor], writer_device: int | None) -> None:
    """Put back the CUDA generator states saved by :func:`cuda_rng_state`.

    With as many devices as were saved, each gets its own state back; the device this process
    trains on continues the stream of the device the writing rank trained on, since every rank
    was seeded alike and draws alike.
    """
    if "cuda" not in rng:
        return
    if not torch.cuda.is_available():
        log.warning("the checkpoint holds CUDA RNG states but CUDA is not available: they are not restored")
        return
    states = list(rng["cuda"])
    if len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)
    if writer_device is not None and writer_device < len(states):
        torch.cuda.set_rng_state(states[writer_device], torch.cuda.current_device())


FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")
# A full disk, a folder this user may not write, a read-only file system, a spent quota, a file size limit.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.EFBIG}


class CheckpointWriteError(ModelFolderError):
    """A checkpoint that could not be written; the previous one is kept."""


def _step(name: str) -> None:
    """Called after each write, rename and delete of the save sequence.

    ``CHIASM_CHECKPOINT_STEP_DELAY`` (seconds) pauses there: a crash test widens the window
    in which a kill lands inside a checkpoint write. Tests also replace this function to stop
    the sequence at a chosen point.
    """
    delay = os.environ.get("CHIASM_CHECKPOINT_STEP_DELAY")
    if delay:
        time.sleep(float(delay))


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries, after a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data))
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:  # its I/O errors carry the OS error only in the text: "(os error 28)"
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
    _fsync(path)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its completeness marker (``state.json``) first.

    A delete cut short then leaves a folder that :func:`is_complete` refuses, never one that
    looks whole with files missing.
    """
    marker = folder / "state.json"
    if marker.exists():
        marker.unlink()
        _step(f"unlink {marker.name}")
    if folder.exists():
        shutil.rmtree(folder)
        _step(f"rmtree {folder.name}")


def save_checkpoint(folder: Path, params: dict[str, torch.Tensor], trained: set[str],
                    optimizer_state: dict[str, Any], state: TrainState) -> None:
    """Write the full training state (from :func:`gather_state`) to ``folder``, crash-safely.

    The files go to ``folder.tmp``, each flushed to the disk, ``state.json`` last: it is the
    marker of a complete folder. Then ``folder`` becomes ``folder.old``, ``folder.tmp``
    becomes ``folder`` and ``folder.old`` is deleted. A kill at any point leaves a complete
    ``folder``, ``folder.tmp`` or ``folder.old`` that :func:`recover` puts back in place. A
    disk that is full or a folder that cannot be written raises :class:`CheckpointWriteError`
    naming the path, and the previous checkpoint stays.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    try:
        _write_all(folder, tmp, params, trained, optimizer_state, state)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        with contextlib.suppress(OSError):
            _remove(tmp)
        where = exc.filename or tmp
        raise CheckpointWriteError(f"cannot write the checkpoint at {where}: {exc.strerror or exc}; "
                                   f"the last good checkpoint in {folder} is kept") from exc


def _write_all(folder: Path, tmp: Path, params: dict[str, torch.Tensor], trained: set[str],
               optimizer_state: dict[str, Any], state: TrainState) -> None:
    _remove(tmp)
    tmp.mkdir(parents=True)
    _step("mkdir tmp")
    params = {k: v.detach().contiguous() for k, v in params.items() if k in trained}
    _save_tensors(params, tmp / "model.safetensors")
    _step("write model.safetensors")
    tensors, scalars = _split_optimizer(optimizer_state)
    _save_tensors(tensors, tmp / "optimizer.safetensors")
    _step("write optimizer.safetensors")
    _write_json(tmp / "optimizer.json", scalars)
    _step("write optimizer.json")
    _save_tensors({"torch": torch.get_rng_state(), **cuda_rng_state()}, tmp / "rng.safetensors")
    _step("write rng.safetensors")
    py_state = random.getstate()
    meta = {"stage_index": state.stage_index, "step": state.step, "stage_done": state.stage_done,
            "world": state.world,
            "cuda_device": torch.cuda.current_device() if torch.cuda.is_available() else None,
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]], "trained": sorted(trained)}
    _write_json(tmp / "state.json.part", meta)
    _step("write state.json.part")
    (tmp / "state.json.part").rename(tmp / "state.json")
    _fsync(tmp)
    _step("rename state.json")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        _remove(old)
        folder.rename(old)
        _fsync(folder.parent)
        _step("rename folder -> old")
    tmp.rename(folder)
    _fsync(folder.parent)
    _step("rename tmp -> folder")
    _remove(old)


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every checkpoint file and a readable ``state.json``."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in FILES):
        return False
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "step" in meta


def recover(folder: Path) -> Path | None:
    """Put the checkpoint a killed save left behind back at ``folder``; None if there is none.

    ``folder`` itself when complete, else a complete ``folder.tmp`` (the new state, killed
    before its rename), else ``folder.old`` (the previous state). Only the writing rank calls
    this; the others wait at a barrier, then read ``folder``.
    """
    folder = Path(folder)
    if is_complete(folder):
        return folder
    for suffix in (".tmp", ".old"):
        candidate = folder.with_name(folder.name + suffix)
        if is_complete(candidate):
            log.warning("%s is missing or incomplete: resuming from %s (a save was cut short)", folder, candidate)
            if folder.exists():
                shutil.rmtree(folder)
            candidate.rename(folder)
            _fsync(folder.parent)
            return folder
    return None


def remove_all(folder: Path) -> None:
    """Delete ``folder`` and its ``.tmp``/``.old`` siblings: a run that starts over."""
    folder = Path(folder)
    for path in (folder, folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")):
        if path.exists():
            _remove(path)


def read_state(folder: Path) -> TrainState | None:
    """The stage/step a checkpoint was taken at, or None if there is no checkpoint."""
    f = Path(folder) / "state.json"
    if not f.exists():
        return None
    meta = _read_json(f)
    return TrainState(meta["stage_index"], meta["step"], meta["stage_done"], meta.get("world"))


def load_model_state(folder: Path, model: VisionLanguageModel) -> set[str]:
    """Load trained parameters into ``model``; every checkpointed name must exist in it."""
    params = _read_tensors(Path(folder) / "model.safetensors")
    own = model.state_dict()
    missing = sorted(set(params) - set(own))
    if missing:
        raise RuntimeError(f"checkpoint holds parameters the model lacks (policies changed?): {missing[:5]}")
    model.load_state_dict(params, strict=False)
    return set(params)


def load_optimizer_and_rng(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    folder = Path(folder)
    tensors = _read_tensors(folder / "optimizer.safetensors")
    scalars = _read_json(folder / "optimizer.json")
    sd = _join_optimizer(tensors, scalars)
    if _sharded(optimizer):
        from chiasm.train.fsdp import shard_optimizer_state

        sd = shard_optimizer_state(sd, optimizer)
    # The moments and step counts come from the checkpoint; lr and weight decay stay the current
    # config's (chiasm.train.resume_config decides which changes a resume may make).
    current = [{k: g[k] for k in ("lr", "base_lr", "weight_decay") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(sd)
    for group, values in zip(optimizer.param_groups, current, strict=True):
        group.update(values)
    load_rng(folder)


def load_rng(folder: Path) -> None:
    """Put back the CPU, CUDA and python RNG states the checkpoint was taken with."""
    folder = Path(folder)
    rng = _read_tensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    meta = _read_json(folder / "state.json")
    restore_cuda_rng(rng, meta.get("cuda_device"))
    v, inner, gauss = meta["python_rng"]
    random.setstate((v, tuple(inner), gauss))


def _sharded(optimizer: torch.optim.Optimizer) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])


def _unreadable(path: Path, exc: Exception) -> ModelFolderError:
    return ModelFolderError(f"{path}: unreadable checkpoint file ({exc}); run without --resume to start over, "
                            f"or restore {path.parent} from a copy")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a missing or corrupt one is named (a run killed mid-write)."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise _unreadable(path, exc) from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
