"""Process-group set-up for torchrun (gloo on CPU, NCCL on GPUs) or a single process.

Every collective here builds its tensor on the device the process group's backend needs:
NCCL moves only CUDA tensors, so a CPU tensor that passes under gloo fails under NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Backends that move tensors of one device type only; the rest (gloo, mixed "cpu:gloo,cuda:nccl")
# take CPU tensors.
DEVICE_ONLY_BACKENDS = {"nccl": "cuda", "xccl": "xpu"}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(requested: str, cuda: bool) -> str:
    """The backend string for ``init_process_group``.

    With CUDA, "auto" pairs NCCL (for CUDA tensors) with gloo (for CPU ones), so a CPU-side
    collective still works; without CUDA it is gloo. An explicit "gloo" or "nccl" is kept.
    """
    if requested == "auto":
        return "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise RuntimeError("backend 'nccl' needs CUDA GPUs, and torch sees none; use backend 'gloo' or 'auto'")
    return requested


def env_world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        name = process_group_backend(backend, cuda)
        # Binding the device lets NCCL set up eagerly and know each rank's GPU for barriers.
        dist.init_process_group(name, device_id=device if "nccl" in name else None)
    return DistInfo(rank, world, local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where a tensor must live for the default process group's collectives."""
    backend = str(dist.get_backend())
    needs = DEVICE_ONLY_BACKENDS.get(backend)
    if needs is None:
        return torch.device("cpu")
    return torch.device(needs, getattr(torch, needs).current_device())


def barrier() -> None:
    if not is_distributed():
        return
    device = collective_device()
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])  # NCCL otherwise guesses the device from the rank
    else:
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    """Average a float over ranks (for logging the same loss on every rank)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one: a decision all ranks must share."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def supervised_tokens(batch: object | None) -> int:
    """The tokens a batch's loss averages over: labelled next-token targets (none for a skipped batch)."""
    if batch is None:
        return 0
    return int((batch.labels[:, 1:] != -100).sum())


def token_weights(counts: list[int]) -> list[float]:
    """Per micro-batch weights that make a step's loss the mean over every supervised token.

    ``counts`` are this rank's micro-batches' supervised tokens. Each micro-batch's loss is a
    mean over its own tokens; the trainer divides by the number of micro-batches and DDP
    averages over ranks. Weighting micro-batch ``m`` by ``count_m * micro_batches * world /
    total`` (total over the step's micro-batches on all ranks) turns that mean of means into
    the mean over all the step's tokens, which does not depend on how the step's samples are
    split into micro-batches and ranks. One micro-batch in one process gets 1.0.
    """
    local = float(sum(counts))
    total = local
    if is_distributed():
        t = torch.tensor([local], dtype=torch.float64, device=collective_device())
        dist.all_reduce(t)
        total = float(t.item())
    if total <= 0:
        return [1.0] * len(counts)
    world = dist.get_world_size() if is_distributed() else 1
    return [c * len(counts) * world / total for c in counts]
