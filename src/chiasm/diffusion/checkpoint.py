"""Resumable checkpoints of a diffusion run: weights, EMA, optimizer, data-order RNG and step.

Written to ``checkpoint.tmp/`` and renamed into place, with ``state.json`` last, so a kill
leaves either the old or the new checkpoint whole. Tensors go to safetensors (no pickles);
the optimizer is split into tensors and JSON scalars with chiasm's trainer helpers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chiasm.errors import ModelFolderError
from chiasm.train.checkpoint import _join_optimizer, _split_optimizer


def save(folder: Path, net: torch.nn.Module, ema: dict[str, torch.Tensor], ema_updates: int,
         optimizer: torch.optim.Optimizer, rng: torch.Generator, step: int) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "unet.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    tensors, scalars = _split_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(scalars))
    save_file({"data_rng": rng.get_state(), "torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "ema_updates": ema_updates}))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def recover(folder: Path) -> Path | None:
    """The complete checkpoint among ``folder``, ``.tmp`` and ``.old`` (a kill mid-save leaves one of them)."""
    for cand in (folder, folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")):
        if (cand / "state.json").is_file():
            return cand
    return None


def load(folder: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
         rng: torch.Generator) -> tuple[int, dict[str, torch.Tensor], int]:
    """Restore in place; returns (step, EMA weights, EMA update count)."""
    try:
        state: dict[str, Any] = json.loads((folder / "state.json").read_text())
        net.load_state_dict(load_file(str(folder / "unet.safetensors")))
        ema = load_file(str(folder / "ema.safetensors"))
        optimizer.load_state_dict(_join_optimizer(load_file(str(folder / "optimizer.safetensors")),
                                                  json.loads((folder / "optimizer.json").read_text())))
        rngs = load_file(str(folder / "rng.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFolderError(f"checkpoint {folder} cannot be read ({exc}); start without --resume") from None
    rng.set_state(rngs["data_rng"])
    torch.set_rng_state(rngs["torch_rng"])
    return int(state["step"]), ema, int(state["ema_updates"])
