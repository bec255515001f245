"""CogVLM's visual expert: image tokens get their own attention projections and MLP.

Every decoder layer gains a second copy of q/k/v/o and of the MLP, initialised from the
LM's own weights. Image tokens go through the copies, text tokens through the original
(frozen) weights, and both meet in one shared self-attention. Text-only inputs therefore
compute exactly what the base LM computes, whatever the experts learn: language ability
is preserved by construction while visual capacity grows.

Image tokens reach the sequence through an MLP adapter (as in CogVLM) at the placeholder
positions; the experts are switched in by forward hooks on the LM's own modules, so the
LM's checkpoint stays a plain transformers one. With a LoRA policy on the LM, the LoRA
update of q/k/v/o also applies to image tokens on top of the expert (saving folds it into
the expert's copies, see ``export_state``); the expert MLP replaces the LM's whole MLP.

Which positions are image tokens reaches the layers as a keyword argument of the LM's
forward (``chiasm.bridges.layer_inputs``). Each layer's self-attention receives it and
looks up the positions of its own call; the projections and the MLP of that same layer
call read that lookup, which lives only from the layer's attention to the end of its MLP,
so a recomputation under activation checkpointing redoes it with the layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from chiasm.bridges.base import BRIDGES, Bridge
from chiasm.bridges.layer_inputs import IMAGE_POSITIONS, accept_in_generate, call_positions
from chiasm.bridges.projectors import MLPBridge
from chiasm.lm.layers import decoder_layers, unwrap_peft

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@BRIDGES.register("visual_expert")
class VisualExpertBridge(Bridge):
    in_lm = True

    def __init__(self, vision_dim: int, lm_dim: int, hidden: int | None = None):
        super().__init__(vision_dim, lm_dim)
        self.adapter = MLPBridge(vision_dim, lm_dim, hidden=hidden)
        self.experts = nn.ModuleList()
        # Image positions of the layer call in progress, per layer: set when the layer's
        # attention starts, read by its projections and MLP, dropped when its MLP ends. Every
        # call of a layer sets its entry afresh, so nothing carries over from one call to the
        # next (a recomputation that stops early may leave an entry until that next call).
        self._in_call: dict[int, torch.Tensor | None] = {}

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        return self.adapter.token_grid(grid)  # the adapter's tokens, one per cell, are the sequence's image tokens

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.adapter(features, grid)

    def layer_inputs(self, features: torch.Tensor, grid: tuple[int, int],
                     is_image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {IMAGE_POSITIONS: is_image}

    def attach(self, lm: nn.Module) -> None:
        layers = decoder_layers(lm)
        for i, layer in enumerate(layers):
            _check_layout(lm, i, layer)
        if not len(self.experts):  # a fresh bridge: copy the LM's own weights
            for layer in layers:
                parts = {p: copy.deepcopy(getattr(layer.self_attn, p)) for p in PROJECTIONS}
                self.experts.append(nn.ModuleDict({**parts, "mlp": copy.deepcopy(layer.mlp)}))
        for idx, (layer, expert) in enumerate(zip(layers, self.experts, strict=True)):
            layer.self_attn.register_forward_pre_hook(self._start_hook(idx), with_kwargs=True)
            for p in PROJECTIONS:
                getattr(layer.self_attn, p).register_forward_hook(self._hook(idx, expert[p]))
            layer.mlp.register_forward_hook(self._hook(idx, expert["mlp"], last=True), always_call=True)
        accept_in_generate(lm, (IMAGE_POSITIONS,))

    def _start_hook(self, idx: int):
        def run(module: nn.Module, args: tuple, kwargs: dict) -> None:
            positions = kwargs.get(IMAGE_POSITIONS)
            mask = None
            if positions is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                pos = call_positions(kwargs, idx, hidden.shape[1], positions.device)
                # Decoding steps after the prompt are text.
                mask = positions[:, pos.clamp(max=positions.shape[1] - 1)] & (pos < positions.shape[1])
                if not bool(mask.any()):
                    mask = None
            self._in_call[idx] = mask

        return run

    def _hook(self, idx: int, expert: nn.Module, *, last: bool = False):
        def run(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            mask = self._in_call.pop(idx, None) if last else self._in_call.get(idx)
            if mask is None or not isinstance(output, torch.Tensor):
                return None
            x = inputs[0]
            mask = mask.to(x.device)
            out = output.clone()
            out[mask] = expert(x[mask]).to(out.dtype)
            return out

        return run

    def export_state(self, lm: nn.Module) -> dict[str, torch.Tensor]:
        """The experts with the LM's unmerged LoRA updates of q/k/v/o folded into their copies.

        During training an image token's projection is ``expert(x) + lora(x)`` (the hook
        replaces the base output, LoRA adds its update after). Saving merges LoRA into the
        LM's weights, where the hook's replacement would drop it for image tokens; adding the
        same update to the expert's weight keeps every logit as trained.
        """
        state = dict(self.state_dict())
        for idx, layer in enumerate(decoder_layers(lm)):
            for p in PROJECTIONS:
                module = getattr(layer.self_attn, p)
                delta = _unmerged_lora_delta(module, f"layer {idx} self_attn.{p}")
                if delta is not None:
                    key = f"experts.{idx}.{p}.weight"
                    state[key] = state[key] + delta.to(state[key].dtype)
        return state


def _unmerged_lora_delta(module: nn.Module, where: str) -> torch.Tensor | None:
    """The weight update a peft LoRA layer adds in its forward (summed over active adapters), or None."""
    if not hasattr(module, "get_delta_weight") or not hasattr(module, "base_layer"):
        return None
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    delta = None
    for name in module.active_adapters:
        if name not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise NotImplementedError(f"visual_expert: {where} uses DoRA, which cannot be folded into the expert; "
                                      "use plain LoRA or a full LM policy")
        d = module.get_delta_weight(name).detach()
        delta = d if delta is None else delta + d
    return delta

def _check_layout(lm: nn.Module, index: int, layer: nn.Module) -> None:
    """Refuse, at build, a layer whose attention is not four separate projections plus an MLP.

    A fused Q/K/V linear (Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``) could be
    split, but the expert would then no longer be a copy of the LM's own modules hooked in
    place; such LMs are better served by a bridge that reads the image from outside the layer.
    """
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(layer, "mlp") and all(isinstance(getattr(attn, p, None), nn.Linear)
                                                           for p in PROJECTIONS):
        return
    base = unwrap_peft(lm)
    linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and "mlp" not in n.split(".")]
    raise NotImplementedError(
        f"visual_expert copies separate self_attn.{'/'.join(PROJECTIONS)} projections and an mlp in every "
        f"decoder layer, but {type(base).__name__}'s layer {index} has the attention linear layers "
        f"{', '.join(linears) or 'none'}: fused (Phi-3, GPT-NeoX) or differently named projections cannot be "
        "copied per role; choose another bridge (gated_xattn works inside any decoder)")
