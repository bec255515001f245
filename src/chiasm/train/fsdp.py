"""FSDP2 (``fully_shard``) for one training stage, and the way back to a plain model after it.

Sharded: every LM decoder layer, the layers of an encoder that trains, then the whole module
a stage trains (its root group holds the rest: embeddings, LM head, bridge, encoder stem).
The LM as a unit is not a group of its own because the model calls its parts directly (the
input embeddings before the LM, the decoder and the head apart for the supervised-only head)
and only the root's forward gathers those.

Between stages the model must be plain again: new LoRA adapters are added, rank 0 alone
saves, evaluates or caches features. FSDP2 has no public inverse of ``fully_shard``, so
:func:`unshard_for_good` gathers every parameter whole and removes FSDP's hooks and state
from the modules; its test checks that the result is a plain, trainable module.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
from torch.distributed._composable_state import _module_state_mapping
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.hooks import RemovableHandle

from chiasm.lm.layers import decoder_layers
from chiasm.model import VisionLanguageModel

# Forward hooks that make the LM's input embeddings require grad while a model is sharded.
_INPUT_GRAD_HOOKS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def shard_groups(module: nn.Module, model: VisionLanguageModel, *, text_only_samples: bool = False) -> list[nn.Module]:
    """The submodules that get an FSDP group of their own, bottom-up, before the root's.

    A trainable encoder's blocks get groups only if every sample has an image: a rank whose
    batch has none never runs them, FSDP would reduce their gradients at the end of its
    backward while the other ranks do it in the middle, and the ranks' collectives would no
    longer pair up. In the root group the encoder is reduced with the root on every rank.
    """
    if module is not model:  # a bridge-only stage: one group is enough
        return []
    try:
        groups: list[nn.Module] = list(decoder_layers(model.base_lm))
    except NotImplementedError as exc:
        raise NotImplementedError(f"strategy 'fsdp' shards the LM layer by layer and can't find its layers: {exc}; "
                                  "use strategy 'ddp'") from None
    if not text_only_samples and any(p.requires_grad for p in model.encoder.parameters()):
        try:
            groups += model.encoder.blocks()
        except NotImplementedError:
            pass  # the encoder stays in the root group
    return groups


def shard(module: nn.Module, model: VisionLanguageModel, device: torch.device, world: int,
          unused_parameters: bool, *, text_only_samples: bool = False) -> nn.Module:
    """Apply ``fully_shard`` in place to ``module`` (the model, or the bridge of a pre-alignment stage)."""
    mesh = init_device_mesh(device.type, (world,))
    for group in shard_groups(module, model, text_only_samples=text_only_samples):
        fully_shard(group, mesh=mesh)
    fully_shard(module, mesh=mesh)
    if module is model:
        # FSDP reduces a layer's gradients once they reach its input. With frozen embeddings and
        # no image in a rank's batch, the first layer's input needs no gradient, so that rank
        # would reduce the layer only at the end of backward, out of step with the others.
        _INPUT_GRAD_HOOKS[module] = model.lm.get_input_embeddings().register_forward_hook(
            lambda _m, _inputs, out: out.requires_grad_(True))
    if unused_parameters:
        # Zero gradients for parameters a rank did not use keep every rank's reduce-scatters matched.
        module.set_reduce_scatter_unused_params(True)
    return module


@torch.no_grad()
def unshard_for_good(root: nn.Module) -> None:
    """Turn a ``fully_shard``-ed module tree back into plain modules holding full parameters.

    Every rank must call it (the gathers are collectives), in the same state.
    """
    hook = _INPUT_GRAD_HOOKS.pop(root, None)
    if hook is not None:
        hook.remove()
    fsdp_modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.reshard()  # the registered parameters are the sharded DTensors from here on
    full: dict[int, nn.Parameter] = {}  # by id: tied weights stay one parameter
    for module in root.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in full:
                    full[id(p)] = nn.Parameter(p.full_tensor().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = full[id(p)]
    for m in fsdp_modules:
        state = m._get_fsdp_state()
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        for group in state._fsdp_param_groups:
            for handles in (group._module_to_pre_save_state_dict_hook_handle,
                            group._module_to_pre_load_state_dict_hook_handle):
                for handle in handles.values():
                    handle.remove()
            for fsdp_param in group.fsdp_params:
                handle = getattr(fsdp_param, "_post_load_hook_handle", None)
                if handle is not None:
                    handle.remove()
        m.__class__ = next(c for c in type(m).__bases__ if c is not FSDPModule)
        m.__dict__.pop(STATE_KEY, None)
        m.__dict__.pop(REGISTRY_KEY, None)
        _module_state_mapping.pop(m, None)
    for module in root.modules():
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(attr, None)


def full_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """Whole tensors, on the CPU, for DTensor values (a collective: every rank calls it, same keys, same order).

    One tensor at a time goes whole on the device, so a checkpoint never needs the whole model there.
    """
    return {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in state.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole tensors, the layout a one-process run saves.

    Index-keyed like the plain state dict, so a checkpoint does not depend on the strategy
    that wrote it: a DDP run resumes an FSDP checkpoint and the other way round.
    """
    sd = optimizer.state_dict()
    state = {idx: full_tensors(st) for idx, st in sorted(sd["state"].items())}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Cut whole tensors in a loaded optimizer state to the shards of the (DTensor) parameters they belong to."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        if isinstance(p, DTensor):
            # Every rank holds the same whole tensor (read from one file): no data needs to move.
            st = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                  if torch.is_tensor(v) and v.shape == p.shape else v for k, v in st.items()}
        state[idx] = st
    return {"state": state, "param_groups": sd["param_groups"]}
