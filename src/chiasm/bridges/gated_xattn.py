"""Flamingo's gated cross-attention: the frozen LM reads the image through new layers.

Before every ``every``-th decoder layer a GATED XATTN-DENSE block is run:
``h += tanh(a) * xattn(ln(h), image)`` then ``h += tanh(b) * ffw(ln(h))`` with ``a = b = 0``
at initialisation, so an untrained model computes exactly what the bare LM computes.
The image enters as a Perceiver-resampled memory; the sequence holds one learned marker
token per image, and each token attends only to the most recent image before it.

The blocks are installed with forward pre-hooks on the LM's decoder layers, so the LM's
own modules and checkpoint stay untouched (Llama, Mistral, Qwen2, SmolLM2 layouts).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from chiasm.bridges.base import BRIDGES, Bridge
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
        """``h`` (B, L, D); ``memory`` (n_images, M, D) or None; ``image_of_token`` (B, L), -1 for none."""
        if memory is not None:
            h = h + torch.tanh(self.gate_attn) * self._attend(h, memory, image_of_token)
        return h + torch.tanh(self.gate_ff) * self.ff(self.ln_ff(h))

    def _attend(self, h: torch.Tensor, memory: torch.Tensor, image_of_token: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        hd = d // self.heads
        has = image_of_token >= 0
        mem = memory[image_of_token.clamp(min=0)]  # (B, L, M, D): each token's own image
        k, v = self.kv(mem.to(h.dtype)).chunk(2, dim=-1)
        q = self.q(self.ln_attn(h)).view(b, n, self.heads, hd)
        k = k.view(b, n, -1, self.heads, hd)
        v = v.view(b, n, -1, self.heads, hd)
        weights = torch.einsum("blhd,blmhd->blhm", q, k).mul(hd**-0.5).softmax(-1)
        attn = torch.einsum("blhm,blmhd->blhd", weights, v).reshape(b, n, d)
        return self.out(attn) * has[..., None].to(h.dtype)  # tokens before any image see nothing


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
        self._handles: list = []
        self._memory: torch.Tensor | None = None
        self._image_of_token: torch.Tensor | None = None
        self._enabled = True

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return 1  # one marker per image; the image itself arrives through cross-attention

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self._memory = self.resampler(features, grid)
        return self.marker.expand(features.shape[0], 1, -1)

    def bind(self, is_image: torch.Tensor) -> None:
        counts = is_image.long().cumsum(1)  # images seen so far in the row
        offsets = is_image.long().sum(1).cumsum(0) - is_image.long().sum(1)  # first global image index per row
        self._image_of_token = torch.where(counts > 0, counts - 1 + offsets[:, None], -1)

    def release(self) -> None:
        self._memory = None
        self._image_of_token = None

    def attach(self, lm: nn.Module) -> None:
        layers = decoder_layers(lm)
        chosen = list(range(0, len(layers), self.every))
        dim = self.lm_dim
        if not len(self.blocks):
            self.blocks.extend(GatedXAttnDense(dim, self.heads) for _ in chosen)
        for block, idx in zip(self.blocks, chosen, strict=True):
            self._handles.append(layers[idx].register_forward_pre_hook(self._hook(block), with_kwargs=True))

    def _hook(self, block: GatedXAttnDense):
        def run(module: nn.Module, args: tuple, kwargs: dict):
            if not self._enabled:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if self._image_of_token is None:  # a text-only call: the dense blocks still run, no image
                hidden = block(hidden, None, None)
            else:
                images = self._image_of_token.to(hidden.device)
                n, known = hidden.shape[1], images.shape[1]
                # Decoding steps (with or without a KV cache) come after the prompt: they see the
                # last image of their row.
                last = images[:, -1:]
                images = torch.cat([images, last.expand(-1, n - known)], 1) if n >= known else last.expand(-1, n)
                hidden = block(hidden, self._memory, images)
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
