"""The batched decoding loop on embedded prompts: prefill once, then one token per step.

Prompts arrive left-padded (the processor's layout for generation) as embeddings, with the
keyword arguments that in-LM bridges read in the LM's layers. Position ids count real
tokens only (a row padded by 5 starts at position 0 after its padding), the attention mask
grows by one column per step, and the KV cache holds every column: so the cache length is
the column index, which is what in-LM bridges use to look up their per-prompt tensors
(``chiasm.bridges.layer_inputs.call_positions``).

Rows that have finished leave the batch: their cache rows, mask rows and bridge inputs
are dropped, so a long answer does not make the short ones pay for its steps. Without a
cache (``use_cache=False``) every step runs the whole sequence again; that is the
reference the cached path is tested against.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from chiasm.lm.layers import unwrap_peft


class BatchDecoder:
    """Decoding state of one batch: ``logits()`` for the rows still active, ``advance`` to feed their tokens."""

    def __init__(self, lm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor,
                 layer_inputs: dict[str, torch.Tensor], *, use_cache: bool = True,
                 suppress: list[int] | None = None):
        self.lm = lm
        self.embed_tokens = lm.get_input_embeddings()
        self.use_cache = use_cache
        self.mask = attention_mask.long()
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.layer_inputs = dict(layer_inputs)
        self.active = list(range(embeds.shape[0]))  # the original row of each row still in the batch
        self.suppress = [i for i in (suppress or []) if i >= 0]
        self.cache = DynamicCache(config=unwrap_peft(lm).config) if use_cache else None
        self.embeds = embeds  # the whole sequence, kept only without a cache
        self._last_only = {"logits_to_keep": 1} if _keeps_logits(lm) else {}
        self._logits = self._forward(embeds, self.positions, last_only=True)

    def logits(self) -> torch.Tensor:
        """``(n_active, V)`` float logits of each active row's next token."""
        return self._logits

    def advance(self, tokens: torch.Tensor, keep: list[bool]) -> bool:
        """Drop the rows not kept, feed the kept rows' ``tokens``; False when no row is left."""
        if not any(keep):
            self.active = []
            return False
        if not all(keep):
            idx = torch.tensor([i for i, k in enumerate(keep) if k], device=self.mask.device)
            self._select(idx)
            tokens = tokens[idx]
        new = self.embed_tokens(tokens[:, None].to(self.mask.device))
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        step_pos = self.positions[:, -1:] + 1
        self.positions = torch.cat([self.positions, step_pos], dim=1)
        if self.cache is not None:
            self._logits = self._forward(new, step_pos, last_only=True)
        else:
            self.embeds = torch.cat([self.embeds, new.to(self.embeds.dtype)], dim=1)
            self._logits = self._forward(self.embeds, self.positions, last_only=True)
        return True

    def _select(self, idx: torch.Tensor) -> None:
        self.active = [self.active[i] for i in idx.tolist()]
        self.mask, self.positions = self.mask[idx], self.positions[idx]
        self.layer_inputs = {k: v[idx] for k, v in self.layer_inputs.items()}  # every one is batch-first
        if self.cache is not None:
            self.cache.batch_select_indices(idx)
        else:
            self.embeds = self.embeds[idx]

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, *, last_only: bool) -> torch.Tensor:
        extra = self._last_only if last_only else {}
        out = self.lm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                      past_key_values=self.cache, use_cache=self.use_cache, **extra, **self.layer_inputs)
        logits = out.logits[:, -1].float()
        if self.suppress:
            logits[:, [i for i in self.suppress if i < logits.shape[-1]]] = float("-inf")
        return logits


def _keeps_logits(lm: nn.Module) -> bool:
    """Whether the LM's forward can compute the head for the last position only."""
    return "logits_to_keep" in inspect.signature(unwrap_peft(lm).forward).parameters


@torch.no_grad()
def greedy_rows(lm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor,
                layer_inputs: dict[str, torch.Tensor], *, max_new_tokens: int, stop_ids: list[int],
                use_cache: bool = True, suppress: list[int] | None = None) -> list[list[int]]:
    """Greedy new token ids per row, each cut before its first stop id (the engine's greedy rule)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dec = BatchDecoder(lm, embeds, attention_mask, layer_inputs, use_cache=use_cache, suppress=suppress)
    rows: list[list[int]] = [[] for _ in range(embeds.shape[0])]
    stop = set(stop_ids)
    while True:
        tokens = dec.logits().argmax(-1)
        keep = []
        for row, token in zip(dec.active, tokens.tolist(), strict=True):
            if token not in stop:
                rows[row].append(token)
            keep.append(token not in stop and len(rows[row]) < max_new_tokens)
        if not dec.advance(tokens, keep):
            return rows
