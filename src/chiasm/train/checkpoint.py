"""Full-state checkpoints without pickles: weights, optimizer, schedule position, RNG, data position.

Layout of ``RUN/checkpoint/``: ``model.safetensors`` (every parameter some stage so far
has trained), ``optimizer.safetensors`` + ``optimizer.json`` (tensor and scalar parts of
the optimizer state), ``rng.safetensors`` (the CPU RNG, and each CUDA device's where CUDA
is used) and ``state.json`` (stage index, optimizer step, python RNG). The step number fixes
the data position, since batches are a pure function of (seed, stage, epoch, step). Writes
go to a temporary folder renamed into place, so a run killed mid-write keeps the previous
checkpoint. Under FSDP every rank joins in gathering whole tensors (:func:`gather_state`)
and rank 0 writes the same layout as one process does.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
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


def save_checkpoint(folder: Path, params: dict[str, torch.Tensor], trained: set[str],
                    optimizer_state: dict[str, Any], state: TrainState) -> None:
    """Atomically write the full training state (from :func:`gather_state`) to ``folder``."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    params = {k: v.detach().contiguous() for k, v in params.items() if k in trained}
    save_file(params, str(tmp / "model.safetensors"))
    tensors, scalars = _split_optimizer(optimizer_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(scalars))
    save_file({"torch": torch.get_rng_state(), **cuda_rng_state()}, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    meta = {"stage_index": state.stage_index, "step": state.step, "stage_done": state.stage_done,
            "cuda_device": torch.cuda.current_device() if torch.cuda.is_available() else None,
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]], "trained": sorted(trained)}
    (tmp / "state.json").write_text(json.dumps(meta))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def read_state(folder: Path) -> TrainState | None:
    """The stage/step a checkpoint was taken at, or None if there is no checkpoint."""
    f = Path(folder) / "state.json"
    if not f.exists():
        return None
    meta = _read_json(f)
    return TrainState(meta["stage_index"], meta["step"], meta["stage_done"])


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
    optimizer.load_state_dict(sd)
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
