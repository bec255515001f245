"""What in-LM bridges read inside the LM's layers, carried as the LM's own keyword arguments.

A bridge that works inside the LM's layers (gated cross-attention, visual expert) needs
per-batch facts there: which positions hold image tokens, the image memory, which image
each token belongs to. They travel as extra keyword arguments of the LM's ``forward`` (and
``generate``): transformers' Llama-family models pass unknown keyword arguments from
``model(...)`` down to every decoder layer and on into its self-attention, where the
bridge's hooks read them. Nothing is stored on a module between calls, so a recomputation
under activation checkpointing and every step of beam search see exactly the tensors of
their own call (``generate`` repeats every tensor argument per beam along dimension 0,
which is why each one has the batch first).

One call of a layer covers the positions ``past .. past + n`` of the sequence, where
``past`` is what the KV cache already holds: the prompt first, then decoding steps that
come after it. ``call_positions`` gives those positions so that a bridge can look its
per-prompt tensors up for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# Keyword arguments of the LM's forward that in-LM bridges read.
IMAGE_POSITIONS = "chiasm_image_positions"  # (B, L) bool: positions that hold image tokens
IMAGE_MEMORY = "chiasm_image_memory"  # (B, K, M, D): each row's images (K at most), M vectors each
IMAGE_OF_TOKEN = "chiasm_image_of_token"  # (B, L) long: index into the row's K images, -1 for none


def call_positions(kwargs: dict[str, Any], layer_idx: int, n: int, device: torch.device) -> torch.Tensor:
    """Sequence positions of the ``n`` hidden states one layer call receives.

    The KV cache (``past_key_values``, before this layer writes to it) says how many
    positions came before. Without a cache, every call starts at the sequence's beginning.
    """
    cache = kwargs.get("past_key_values")
    past = int(cache.get_seq_length(layer_idx)) if cache is not None else 0
    return torch.arange(past, past + n, device=device)


def accept_in_generate(lm: nn.Module, names: Iterable[str]) -> None:
    """Let ``lm.generate`` take the keyword arguments ``names`` and hand them to every forward.

    ``generate`` checks its extra keyword arguments against the names in the model's
    ``forward`` signature, which for Llama-family models ends in ``**kwargs``: the check
    would refuse them although the model passes them on. The check is kept for every other
    name (typos still fail).
    """
    names = frozenset(names)
    original = getattr(lm, "_validate_model_kwargs", None)
    if original is None:  # a transformers release without the check: nothing to widen
        return
    known = getattr(original, "chiasm_layer_inputs", frozenset())
    if names <= known:
        return
    inner = getattr(original, "chiasm_inner", original)
    allowed = known | names

    def validate(model_kwargs: dict[str, Any]) -> None:
        inner({k: v for k, v in model_kwargs.items() if k not in allowed})

    validate.chiasm_layer_inputs = allowed  # type: ignore[attr-defined]
    validate.chiasm_inner = inner  # type: ignore[attr-defined]
    lm._validate_model_kwargs = validate
