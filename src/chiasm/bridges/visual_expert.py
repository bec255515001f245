"""CogVLM's visual expert: image tokens get their own attention projections and MLP.

Every decoder layer gains a second copy of q/k/v/o and of the MLP, initialised from the
LM's own weights. Image tokens go through the copies, text tokens through the original
(frozen) weights, and both meet in one shared self-attention. Text-only inputs therefore
compute exactly what the base LM computes, whatever the experts learn: language ability
is preserved by construction while visual capacity grows.

Image tokens reach the sequence through an MLP adapter (as in CogVLM) at the placeholder
positions; the experts are switched in by forward hooks on the LM's own modules, so the
LM's checkpoint stays a plain transformers one. With a LoRA policy on the LM, the LoRA
update also applies to image tokens on top of the expert.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from chiasm.bridges.base import BRIDGES, Bridge
from chiasm.bridges.projectors import MLPBridge
from chiasm.lm.layers import decoder_layers

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@BRIDGES.register("visual_expert")
class VisualExpertBridge(Bridge):
    in_lm = True

    def __init__(self, vision_dim: int, lm_dim: int, hidden: int | None = None):
        super().__init__(vision_dim, lm_dim)
        self.adapter = MLPBridge(vision_dim, lm_dim, hidden=hidden)
        self.experts = nn.ModuleList()
        self._is_image: torch.Tensor | None = None

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.adapter(features, grid)

    def bind(self, is_image: torch.Tensor) -> None:
        self._is_image = is_image

    def release(self) -> None:
        self._is_image = None

    def attach(self, lm: nn.Module) -> None:
        layers = decoder_layers(lm)
        for i, layer in enumerate(layers):
            _check_layout(lm, i, layer)
        if not len(self.experts):  # a fresh bridge: copy the LM's own weights
            for layer in layers:
                parts = {p: copy.deepcopy(getattr(layer.self_attn, p)) for p in PROJECTIONS}
                self.experts.append(nn.ModuleDict({**parts, "mlp": copy.deepcopy(layer.mlp)}))
        for layer, expert in zip(layers, self.experts, strict=True):
            for p in PROJECTIONS:
                getattr(layer.self_attn, p).register_forward_hook(self._hook(expert[p]))
            layer.mlp.register_forward_hook(self._hook(expert["mlp"]))

    def _mask(self, n: int) -> torch.Tensor | None:
        """Image positions for a call over ``n`` positions; decoding steps after the prompt are text."""
        mask = self._is_image
        if mask is None or n < mask.shape[1]:
            return None
        if n > mask.shape[1]:
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], n - mask.shape[1])], dim=1)
        return mask

    def _hook(self, expert: nn.Module):
        def run(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            x = inputs[0]
            mask = self._mask(x.shape[1])
            if mask is None or not bool(mask.any()):
                return None
            mask = mask.to(x.device)
            out = output.clone()
            out[mask] = expert(x[mask]).to(out.dtype)
            return out

        return run


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
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and "mlp" not in n.split(".")]
    raise NotImplementedError(
        f"visual_expert copies separate self_attn.{'/'.join(PROJECTIONS)} projections and an mlp in every "
        f"decoder layer, but {type(base).__name__}'s layer {index} has the attention linear layers "
        f"{', '.join(linears) or 'none'}: fused (Phi-3, GPT-NeoX) or differently named projections cannot be "
        "copied per role; choose another bridge (gated_xattn works inside any decoder)")
