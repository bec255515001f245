"""Flamingo's gated cross-attention: the frozen LM reads the image through new layers.

Before every ``every``-th decoder layer a GATED XATTN-DENSE block is run:
``h += tanh(a) * xattn(ln(h), image)`` then ``h += tanh(b) * ffw(ln(h))`` with ``a = b = 0``
at initialisation, so an untrained model computes exactly what the bare LM computes.
The image enters as a Perceiver-resampled memory; the sequence holds one learned marker
token per image, and each token attends only to the most recent image before it.

The blocks are installed with forward pre-hooks on the LM's decoder layers, so the LM's
own modules and checkpoint stay untouched (Llama, Mistral, Qwen2, SmolLM2 layouts). The
image memory and each token's image reach the hooks as keyword arguments of the LM's
forward (``chiasm.bridges.layer_inputs``); a call without them is a text-only call.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from chiasm.bridges.base import BRIDGES, Bridge
from chiasm.bridges.layer_inputs import (
    IMAGE_MEMORY,
    IMAGE_OF_TOKEN,
    accept_in_generate,
    call_positions,
)
from chiasm.bridges.resamplers import PerceiverResampler
from chiasm.lm.layers import decoder_layers

__all__ = ["GatedCrossAttentionBridge", "GatedXAttnDense", "decoder_layers"]


class GatedXAttnDense(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"gated_xattn: LM width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.ln_attn = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ff = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor, memory: torch.Tensor | None,
                image_of_token: torch.Tensor | None) -> torch.Tensor:
        """``h`` (B, L, D); ``memory`` (B, K, M, D) or None; ``image_of_token`` (B, L): index into K, -1 for none."""
        if memory is not None:
            h = h + torch.tanh(self.gate_attn) * self._attend(h, memory, image_of_token)
        return h + torch.tanh(self.gate_ff) * self.ff(self.ln_ff(h))

    def _attend(self, h: torch.Tensor, memory: torch.Tensor, image_of_token: torch.Tensor) -> torch.Tensor:
        """Each token attends to the M vectors of its own image only.

        Keys and values are projected once per image; a mask over the row's K images picks
        each token's own, so nothing of size tokens x M x D is ever built.
        """
        b, n, d = h.shape
        k_images, m = memory.shape[1], memory.shape[2]
        hd = d // self.heads
        k, v = self.kv(memory.to(h.dtype)).chunk(2, dim=-1)  # (B, K, M, D) each
        k = k.reshape(b, k_images * m, self.heads, hd).transpose(1, 2)
        v = v.reshape(b, k_images * m, self.heads, hd).transpose(1, 2)
        q = self.q(self.ln_attn(h)).view(b, n, self.heads, hd).transpose(1, 2)
        # Tokens before any image point at image 0 (never a fully masked row); their output is zeroed.
        own = image_of_token.clamp(min=0)
        image_of_key = torch.arange(k_images, device=h.device).repeat_interleave(m)
        allowed = own[:, None, :, None] == image_of_key  # (B, 1, L, K*M)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        attn = attn.transpose(1, 2).reshape(b, n, d)
        return self.out(attn) * (image_of_token >= 0)[..., None].to(h.dtype)


@BRIDGES.register("gated_xattn")
class GatedCrossAttentionBridge(Bridge):
    in_lm = True

    def __init__(self, vision_dim: int, lm_dim: int, every: int = 4, num_latents: int = 16, depth: int = 1,
                 heads: int = 8):
        super().__init__(vision_dim, lm_dim)
        self.every = every
        self.heads = heads
        self.resampler = PerceiverResampler(vision_dim, lm_dim, num_queries=num_latents, depth=depth, heads=heads)
        self.marker = nn.Parameter(torch.randn(1, lm_dim) * 0.02)
        self.blocks = nn.ModuleList()
        self._enabled = True

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return 1  # one marker per image; the image itself arrives through cross-attention

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.marker.expand(features.shape[0], 1, -1)

    def layer_inputs(self, features: torch.Tensor, grid: tuple[int, int],
                     is_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The resampled image memory per row ``(B, K, M, D)`` and each token's latest image in its row.

        Images are listed in row-major order of their markers (the collator's order); a row
        with fewer than K images leaves its last slots zero, which no token points at.
        """
        memory = self.resampler(features, grid)  # (n_images, M, D)
        per_row = is_image.long().sum(1)
        if int(per_row.sum()) != memory.shape[0]:
            raise ValueError(f"gated_xattn: {memory.shape[0]} image(s) but {int(per_row.sum())} image markers "
                             "in the batch")
        rows = torch.repeat_interleave(torch.arange(is_image.shape[0], device=is_image.device), per_row)
        first = per_row.cumsum(0) - per_row
        slots = torch.arange(memory.shape[0], device=is_image.device) - first[rows]
        k_max = max(int(per_row.max()), 1)
        by_row = memory.new_zeros(is_image.shape[0], k_max, *memory.shape[1:])
        by_row = by_row.index_put((rows, slots), memory)
        image_of_token = is_image.long().cumsum(1) - 1  # the latest image so far; -1 before the first
        return {IMAGE_MEMORY: by_row, IMAGE_OF_TOKEN: image_of_token}

    def attach(self, lm: nn.Module) -> None:
        layers = decoder_layers(lm)
        chosen = list(range(0, len(layers), self.every))
        dim = self.lm_dim
        if not len(self.blocks):
            self.blocks.extend(GatedXAttnDense(dim, self.heads) for _ in chosen)
        for block, idx in zip(self.blocks, chosen, strict=True):
            layers[idx].register_forward_pre_hook(self._hook(block, idx), with_kwargs=True)
        accept_in_generate(lm, (IMAGE_MEMORY, IMAGE_OF_TOKEN))

    def _hook(self, block: GatedXAttnDense, layer_idx: int):
        def run(layer: nn.Module, args: tuple, kwargs: dict):
            if not self._enabled:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            memory = kwargs.get(IMAGE_MEMORY)
            images = kwargs.get(IMAGE_OF_TOKEN)
            if memory is not None:
                # Positions past the prompt (decoding steps, cached or not) see the last image of their row.
                pos = call_positions(kwargs, layer_idx, hidden.shape[1], images.device)
                images = images[:, pos.clamp(max=images.shape[1] - 1)]
            if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
                # The LM's checkpointing covers the layer's forward, not its hooks: recompute the block too.
                hidden = checkpoint(block, hidden, memory, images, use_reentrant=False)
            else:
                hidden = block(hidden, memory, images)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return run

    @contextmanager
    def bypassed(self):
        """Run the LM as if no block were installed (used to compare with the bare LM)."""
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True
