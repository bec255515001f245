"""The denoising network: diffusers' UNet with a time embedding, conditioned on a class or on text.

diffusers' UNet2DModel and UNet2DConditionModel are the reference implementations of Ho et
al.'s and Stable Diffusion's UNets, and writing a third would add code without adding an
idea. A class condition is a learnt embedding added to the time embedding (UNet2DModel's
``num_class_embeds``; one extra row is the "null" class of classifier-free guidance). A text
condition is a sequence of token embeddings that every resolution reads through
cross-attention (UNet2DConditionModel), as in Stable Diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Conditioning = Literal["none", "class", "text"]


@dataclass
class NetConfig:
    """Width per resolution, blocks per level, and how the network is conditioned."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention: bool = True  # self-attention (or cross-attention, for text) at the lowest resolution
    conditioning: Conditioning = "class"
    cond_dropout: float = 0.1  # the share of training samples whose condition is replaced by the null one
    text_dim: int = 384  # width of the text tower's token embeddings (all-MiniLM-L6-v2)
    # Text models: the prompt's mean token embedding (all-MiniLM-L6-v2's own sentence pooling),
    # projected and added to the time embedding, besides cross-attention (as Imagen adds its pooled
    # text embedding): every ResNet block at every resolution then sees the whole prompt.
    text_pooled: bool = False
    # Text models: the levels (0 = the top, full resolution) whose blocks read the prompt through
    # cross-attention. None: every level below the top (a pixel model, where the top level is
    # large). Stable Diffusion reads text at its high-resolution levels; on 8 x 8 latents the top
    # is cheap, and it is where each position decides its colour.
    text_levels: list[int] | None = None
    norm_groups: int = 8


def _blocks(n: int, attention: bool, text: bool,
            text_levels: list[int] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    down_attn = "CrossAttnDownBlock2D" if text else "AttnDownBlock2D"
    if text:  # by default text is read at every resolution below the top, so that position and colour both see it
        levels = set(range(1, n) if text_levels is None else text_levels)
        down = tuple(down_attn if i in levels else "DownBlock2D" for i in range(n))
    else:
        down = tuple(down_attn if attention and i == n - 1 else "DownBlock2D" for i in range(n))
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    return down, up


class Denoiser(nn.Module):
    """output = net(x_t, t, condition); the condition is class ids (B,) or (token embeddings, mask)."""

    def __init__(self, cfg: NetConfig, in_channels: int, sample_size: int, num_classes: int = 0) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel, UNet2DModel

        self.cfg, self.num_classes = cfg, num_classes
        text = cfg.conditioning == "text"
        down, up = _blocks(len(cfg.channels), cfg.attention, text, cfg.text_levels)
        common: dict[str, Any] = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                      block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
                                      down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_groups)
        if text:
            pooled: dict[str, Any] = dict(class_embed_type="projection",
                                          projection_class_embeddings_input_dim=cfg.text_dim) if cfg.text_pooled else {}
            self.unet = UNet2DConditionModel(**common, cross_attention_dim=cfg.text_dim, attention_head_dim=8,
                                             mid_block_type="UNetMidBlock2DCrossAttn", **pooled)
        else:
            classes = num_classes + 1 if cfg.conditioning == "class" else None
            self.unet = UNet2DModel(**common, num_class_embeds=classes, attention_head_dim=min(32, cfg.channels[-1]))

    @property
    def null_class(self) -> int:
        """The label that stands for "no class" (classifier-free guidance's unconditional model)."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if self.cfg.conditioning == "class":
            return self.unet(x, t, class_labels=cond).sample
        if self.cfg.conditioning == "text":
            emb, mask = cond
            pooled = pooled_text(emb, mask) if self.cfg.text_pooled else None
            return self.unet(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask, class_labels=pooled).sample
        return self.unet(x, t).sample


def pooled_text(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, D): the mean of each prompt's token embeddings over its real tokens (padding left out)."""
    w = mask.to(emb.dtype).unsqueeze(-1)
    return (emb * w).sum(1) / w.sum(1).clamp(min=1)


def concat_conditions(a: Any, b: Any) -> Any:
    """Stack two conditions along the batch (class ids, or (embeddings, mask) pairs of one length)."""
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y]) for x, y in zip(a, b, strict=True))
    return torch.cat([a, b])


def drop_conditions(cond: Any, null: Any, p: float, generator: torch.Generator | None = None) -> Any:
    """Replace each sample's condition by the null one with probability ``p`` (classifier-free training)."""
    if cond is None or p <= 0:
        return cond
    first = cond[0] if isinstance(cond, tuple) else cond
    drop = torch.rand(first.shape[0], generator=generator) < p
    if isinstance(cond, tuple):
        return tuple(torch.where(drop.reshape(-1, *[1] * (c.dim() - 1)).to(c.device), n.to(c.device), c)
                     for c, n in zip(cond, null, strict=True))
    return torch.where(drop.to(cond.device), torch.as_tensor(null, device=cond.device), cond)
