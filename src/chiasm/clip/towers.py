"""Image and text towers, each ending in a projection into the shared embedding space.

Every tower splits into ``trunk`` (pixels or tokens -> one pooled vector) and ``project``
(that vector -> the shared space). A locked tower (LiT) keeps its trunk frozen, so its pooled
vectors can be computed once per sample and cached; its projection still trains when the
trunk was not trained for this space (a pretrained encoder has none).
"""

from __future__ import annotations

import torch
from torch import nn

from chiasm.clip.blocks import Transformer
from chiasm.clip.config import ImageTowerConfig, TextTowerConfig


class ViTImageTower(nn.Module):
    """A ViT from scratch with open_clip's parameter layout (class token, ``ln_pre``, ``ln_post``, ``proj``)."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        w = cfg.width
        self.image_size, self.patch = cfg.image_size, cfg.patch_size
        side = cfg.image_size // cfg.patch_size
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(side * side + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, w // cfg.head_width, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))
        self.width = w

    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch
        return side, side

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """All tokens after ``ln_post``: the class token first, then the patch grid row-major."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_post(self.transformer(self.ln_pre(x)))

    def trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens(pixels)[:, 0]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.proj

    def set_checkpointing(self, on: bool) -> None:
        self.transformer.checkpointing = on


class EncoderImageTower(nn.Module):
    """Any chiasm encoder (EfficientNet-Lite0, a transformers tower, ...), its grid mean-pooled, then projected."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int, *, pretrained: bool = True):
        super().__init__()
        from chiasm.encoders.base import build_encoder

        assert cfg.encoder is not None
        self.encoder = build_encoder(cfg.encoder, pretrained=pretrained)
        self.image_size = self.encoder.image_size
        self.proj = nn.Linear(self.encoder.dim, embed_dim, bias=False)
        self.width = self.encoder.dim

    def grid(self) -> tuple[int, int]:
        return self.encoder.grid()

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)

    def trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels).mean(dim=1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)

    def set_checkpointing(self, on: bool) -> None:
        if on and not self.encoder.enable_checkpointing():
            raise ValueError(f"encoder {type(self.encoder).__name__} has no activation checkpointing")


class TextTransformerTower(nn.Module):
    """A causal transformer from scratch (open_clip's text tower), pooled at each caption's end token."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int, vocab_size: int, eos_id: int):
        super().__init__()
        w = cfg.width
        self.eos_id = eos_id
        self.token_embedding = nn.Embedding(vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=w**-0.5)
        self.width = w

    def trunk(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        end = (ids == self.eos_id).int().argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), end]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.text_projection

    def set_checkpointing(self, on: bool) -> None:
        self.transformer.checkpointing = on


class HFTextTower(nn.Module):
    """A transformers text encoder (BERT, MiniLM, ...): token states mean-pooled (or CLS), then projected."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int, *, pretrained: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        from chiasm.bridges.bert_init import resolve_source
        from chiasm.sources import hub_errors

        path, local = resolve_source(cfg.source or "")
        with hub_errors(cfg.source or "", "text tower", "[model.text]"):
            if pretrained:
                self.net = AutoModel.from_pretrained(path, local_files_only=local, dtype=torch.float32,
                                                     trust_remote_code=cfg.trust_remote_code)
            else:
                config = AutoConfig.from_pretrained(path, local_files_only=local,
                                                    trust_remote_code=cfg.trust_remote_code)
                self.net = AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code)
        self.pool = cfg.pool
        self.width = self.net.config.hidden_size
        self.proj = nn.Linear(self.width, embed_dim, bias=False)

    def trunk(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = self.net(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pool == "cls":
            return states[:, 0]
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)

    def set_checkpointing(self, on: bool) -> None:
        if on:
            self.net.gradient_checkpointing_enable()
