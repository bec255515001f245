"""BLIP-2's Q-Former: learned queries through a small BERT-style stack.

Queries self-attend in every layer and cross-attend to the (layer-normed) image features
every ``cross_every`` layers; post-norm residuals and GELU feed-forward blocks as in BERT.
A final linear map takes the query outputs to the LM's width: M tokens per image.

With ``init_from`` (``packaged:all-minilm-l6-v2``, a transformers folder or a hub id) the
stack starts from a BERT-style checkpoint, as BLIP-2 starts from BERT-base:

* width, heads, feed-forward width and LayerNorm eps come from the checkpoint's config;
  ``hidden``/``heads`` may be left out or must agree; ``depth`` defaults to the
  checkpoint's layer count and may be smaller, taking its first ``depth`` layers;
* each layer's self-attention, feed-forward and their LayerNorms are copied from the
  matching BERT layer; cross-attention, the queries and the output map stay random;
* the queries pass through a LayerNorm copied from BERT's embedding LayerNorm (as in
  BLIP-2), so the first copied layer sees inputs normalised the way BERT's were.

The constructor reads only the checkpoint's config; :meth:`QFormer.init_pretrained`
copies the weights (``build_bridge`` calls it; loading a saved model does not).
"""

from __future__ import annotations

import torch
from torch import nn

from chiasm.bridges import bert_init
from chiasm.bridges.base import BRIDGES, Bridge

# Sizes of a randomly initialised Q-Former when neither options nor a checkpoint give them.
_DEFAULT_DEPTH, _DEFAULT_HIDDEN, _DEFAULT_HEADS = 4, 256, 4


class _QFormerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, vision_dim: int, cross: bool, ff_dim: int, eps: float = 1e-5):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln_self = nn.LayerNorm(hidden, eps=eps)
        self.cross = (nn.MultiheadAttention(hidden, heads, kdim=vision_dim, vdim=vision_dim, batch_first=True)
                      if cross else None)
        self.ln_cross = nn.LayerNorm(hidden, eps=eps) if cross else None
        # Exact (erf) GELU, as BERT's "gelu".
        self.ff = nn.Sequential(nn.Linear(hidden, ff_dim), nn.GELU(), nn.Linear(ff_dim, hidden))
        self.ln_ff = nn.LayerNorm(hidden, eps=eps)

    def forward(self, q: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        """One layer; ``feats=None`` skips cross-attention (the plain BERT layer)."""
        q = self.ln_self(q + self.self_attn(q, q, q, need_weights=False)[0])
        if self.cross is not None and feats is not None:
            q = self.ln_cross(q + self.cross(q, feats, feats, need_weights=False)[0])
        return self.ln_ff(q + self.ff(q))


@BRIDGES.register("qformer")
class QFormer(Bridge):
    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 32, depth: int | None = None,
                 hidden: int | None = None, heads: int | None = None, cross_every: int = 2,
                 init_from: str | None = None):
        super().__init__(vision_dim, lm_dim)
        self.init_from = init_from
        if init_from is None:
            depth = _DEFAULT_DEPTH if depth is None else depth
            hidden = _DEFAULT_HIDDEN if hidden is None else hidden
            heads = _DEFAULT_HEADS if heads is None else heads
            ff_dim, eps = 4 * hidden, 1e-5
        else:
            shape = bert_init.read_shape(init_from)
            for name, given, theirs in [("hidden", hidden, shape.hidden), ("heads", heads, shape.heads)]:
                if given is not None and given != theirs:
                    raise ValueError(f"qformer: {name}={given} disagrees with init_from {init_from!r}, whose "
                                     f"{name} is {theirs}; leave {name} out to take the checkpoint's")
            if depth is not None and not 1 <= depth <= shape.layers:
                raise ValueError(f"qformer: depth={depth} but init_from {init_from!r} has {shape.layers} layers; "
                                 f"give 1..{shape.layers} (its first depth layers are copied) or leave depth out")
            depth = shape.layers if depth is None else depth
            hidden, heads, ff_dim, eps = shape.hidden, shape.heads, shape.intermediate, shape.eps
        if hidden % heads:
            raise ValueError(f"qformer: hidden {hidden} is not divisible by heads {heads}")
        self.num_queries = num_queries
        self.ln_vision = nn.LayerNorm(vision_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * 0.02)
        # BLIP-2 normalises the queries with BERT's embedding LayerNorm; only a checkpoint has one.
        self.ln_queries = nn.LayerNorm(hidden, eps=eps) if init_from is not None else None
        self.layers = nn.ModuleList(_QFormerLayer(hidden, heads, vision_dim, cross=i % cross_every == 0,
                                                  ff_dim=ff_dim, eps=eps)
                                    for i in range(depth))
        self.proj = nn.Linear(hidden, lm_dim)

    def init_pretrained(self) -> None:
        """Copy self-attention, feed-forward and LayerNorms from ``init_from``'s first layers."""
        if self.init_from is None:
            return
        state = bert_init.load_state(self.init_from)
        for i, layer in enumerate(self.layers):
            missing, unexpected = layer.load_state_dict(bert_init.qformer_layer_tensors(state, i), strict=False)
            if unexpected or any(not k.startswith(("cross.", "ln_cross.")) for k in missing):
                raise RuntimeError(f"qformer layer {i}: BERT mapping out of date "
                                   f"(missing {missing}, unexpected {unexpected})")
        self.ln_queries.load_state_dict(bert_init.embedding_norm_tensors(state))

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.num_queries

    def start_queries(self) -> torch.Tensor:
        """The ``(num_queries, hidden)`` vectors the first layer reads."""
        return self.queries if self.ln_queries is None else self.ln_queries(self.queries)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        feats = self.ln_vision(features)
        q = self.start_queries().expand(features.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, feats)
        return self.proj(q)
