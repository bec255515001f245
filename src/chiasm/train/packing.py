"""Rows of a batch: one sample per row (padded), or several samples packed into one row.

Packing puts whole samples one after another in a row of at most ``capacity`` tokens, so a
batch of short conversations wastes no compute on padding. Attention stays inside each
sample through the LM's own packed-sequence support: ``position_ids`` restart at 0 at every
sample, and transformers derives a block-causal mask from them when it gets no 2D attention
mask (sdpa, eager and flex attention build that mask). Flash attention reads packed
``position_ids`` only in a batch of one row, so packing refuses it (see ``check_packable``).
Trailing padding restarts at 0 too, so it forms a block of its own that no real token
attends to.

A sample is never split across rows, so its image tokens always stay together with the
text that refers to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chiasm.conversation import IGNORE_INDEX
from chiasm.model import VisionLanguageModel


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: positions into ``lengths`` grouped into rows of at most ``capacity`` tokens.

    Deterministic (ties keep input order), and rows list their samples in input order, so a
    batch packs the same way on every run and every rank.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"sample at position {too_long[0]} has {lengths[too_long[0]]} tokens, "
                         f"more than the packing length {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return [sorted(row) for row in rows]


def build_rows(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], rows: Sequence[Sequence[int]], pad_id: int,
               *, packed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded ``(ids, attention_mask, labels, position_ids)`` of ``rows`` of (ids, labels) pairs.

    ``position_ids`` is None unless ``packed``. In a packed row the first label of every
    sample is ignored: it would otherwise be predicted from the previous sample's last token
    (it is an unsupervised prompt token anyway under the chat template).
    """
    width = max(sum(len(seqs[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            seq_ids, seq_labels = seqs[i]
            n = len(seq_ids)
            ids[r, at : at + n] = torch.tensor(seq_ids)
            labels[r, at : at + n] = torch.tensor(seq_labels)
            mask[r, at : at + n] = 1
            if pos is not None:
                labels[r, at] = IGNORE_INDEX
                pos[r, at : at + n] = torch.arange(n)
            at += n
        if pos is not None:
            pos[r, at:] = torch.arange(width - at)
    return ids, mask, labels, pos


def check_packable(model: VisionLanguageModel, pack_length: int, stage: str) -> None:
    """Refuse set-ups where packed samples would see each other, or rows would not fit the LM."""
    if model.bridge.in_lm:
        raise ValueError(f"stage {stage!r}: pack_length needs a prefix bridge; {type(model.bridge).__name__} works "
                         "inside the LM's layers, where a packed row's samples would see each other's images")
    attn = str(getattr(model.base_lm.config, "_attn_implementation", ""))
    if "flash" in attn:
        raise ValueError(f"stage {stage!r}: pack_length needs sdpa, eager or flex attention; {attn} keeps packed "
                         "samples apart only in a batch of one row")
    if pack_length > model.max_length:
        raise ValueError(f"stage {stage!r}: pack_length {pack_length} exceeds the LM's maximum length "
                         f"{model.max_length}")
