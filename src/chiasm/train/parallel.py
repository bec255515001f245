"""How a stage's module is spread over ranks: DDP or FSDP2, and parameters that get no gradient.

Some trainable parameters never reach a stage's loss: a vision tower read at ``feature_layer
= -2`` leaves its last layer (and CLIP's pooling norm) out, and a micro-batch without images
leaves the encoder and the bridge out on its rank. DDP waits for a gradient of every
parameter and fails at the next step; FSDP's reduce-scatters go out of step between ranks.
:func:`needs_unused_search` finds such parameters with one forward pass of the stage's first
micro-batch (no backward) or from the stage's text-only samples, and the wrapper is then told
to expect them. A parameter on the loss's graph counts as used even where its gradient is
zero (a visual expert's last-layer copies, whose image positions no label reads): DDP gets
that zero from autograd.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from chiasm.config import RunConfig
from chiasm.model import VisionLanguageModel
from chiasm.train.dist import DistInfo, any_rank

log = logging.getLogger(__name__)


def check_parallel_config(cfg: RunConfig, world: int, cuda: bool) -> None:
    """Refuse, before any model is built, a parallel set-up that cannot run, saying why.

    One process ignores ``strategy`` (there is nothing to shard over), so a config written
    for torchrun also runs alone. FSDP takes every stage kind and policy the trainer has
    (bridge-only pre-alignment, frozen/full/LoRA/last-N, in-LM bridges, text replay, gradient
    accumulation); an LM whose decoder layers can't be found is refused once it is loaded.
    """
    if cfg.backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA GPUs, and torch sees none; use backend 'gloo' or 'auto'")
    if world > 1 and not torch.distributed.is_available():
        raise ValueError(f"{world} processes need torch.distributed, which this torch build lacks "
                         f"(strategy {cfg.strategy!r}); run one process")


def unused_parameters(loss: torch.Tensor, module: nn.Module) -> list[str]:
    """Names of ``module``'s trainable parameters that ``loss``'s autograd graph does not reach."""
    reached: set[int] = set()
    seen: set[object] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf this path ends in
        if variable is not None:
            reached.add(id(variable))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in reached]


def needs_unused_search(module: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], setting: bool | None,
                        device: torch.device, *, text_only_samples: bool = False) -> bool:
    """Whether the wrapper must expect parameters without a gradient; the same answer on every rank.

    ``setting`` (the config's ``find_unused_parameters``) decides if given. A stage with
    text-only samples does expect them: a micro-batch without images leaves the encoder and
    the bridge out, whatever the first one did. Otherwise one forward pass of ``loss_fn`` on
    the bare module is traced, with the RNG state put back afterwards so that the probe
    changes no dropout mask of the training steps.
    """
    if setting is not None:
        return setting
    if any_rank(text_only_samples):
        log.info("this stage has samples without images, whose batches give the encoder and bridge no gradient: "
                 "the data-parallel wrapper will expect unused parameters")
        return True
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loss = loss_fn(module)
        names = unused_parameters(loss, module)
        del loss
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        log.info("%d trainable parameter tensors get no gradient from this stage's loss (%s): "
                 "the data-parallel wrapper will expect unused parameters", len(names), shown)
    return any_rank(bool(names))


def wrap(module: nn.Module, model: VisionLanguageModel, strategy: str, info: DistInfo,
         unused: bool, *, text_only_samples: bool = False) -> nn.Module:
    """``module`` ready for data-parallel training (itself in one process)."""
    if info.world == 1:
        return module
    if strategy == "fsdp":
        from chiasm.train.fsdp import shard

        return shard(module, model, info.device, info.world, unused, text_only_samples=text_only_samples)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=unused)


def unwrap(wrapped: nn.Module) -> None:
    """After a stage: a sharded model becomes plain again (a DDP wrapper needs nothing)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(wrapped, FSDPModule):
        from chiasm.train.fsdp import unshard_for_good

        unshard_for_good(wrapped)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Accumulate gradients locally for all but the last micro-batch of an optimizer step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(wrapped, DDP) and not sync:
        with wrapped.no_sync():
            yield
        return
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(sync)
    yield
