"""The bridge seam: encoder features on a grid -> what the language model reads.

Two families share this one interface:

* *prefix bridges* (linear, MLP, pixel shuffle, pooling, resamplers, Q-Former) emit
  ``num_tokens(grid)`` vectors of the LM's width per image; the model splices them into
  the embedded sequence where the image placeholder tokens stand.
* *in-LM bridges* (gated cross-attention, visual experts) change the LM's layers. They
  override ``attach`` to install their modules into the LM, ``layer_inputs`` to say what
  those modules read per batch, and ``num_tokens`` says how many placeholder positions
  (e.g. one marker per image) they still need in the sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from chiasm.config import BridgeConfig
from chiasm.registry import Registry


class Bridge(nn.Module, ABC):
    """Base class of every bridge; ``vision_dim`` -> ``lm_dim``."""

    # True for bridges that work inside the LM's layers (see the module docstring).
    in_lm: bool = False

    def __init__(self, vision_dim: int, lm_dim: int, **options: Any):
        super().__init__()
        self.vision_dim = vision_dim
        self.lm_dim = lm_dim

    @abstractmethod
    def num_tokens(self, grid: tuple[int, int]) -> int:
        """How many sequence positions one image occupies for a feature grid ``(h, w)``."""

    @abstractmethod
    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(B, h*w, vision_dim)`` -> ``(B, num_tokens(grid), lm_dim)``."""

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The ``(rows, cols)`` layout of the emitted tokens in the image, row-major, or None.

        Spatial bridges (projectors, pooling, pixel shuffle, C-Abstractor) keep token ``k`` tied
        to one patch of the image, which region-level objectives need. Learned-query bridges
        (resamplers, Q-Former) mix the whole image into every token: None.
        """
        return None

    def init_pretrained(self) -> None:
        """Copy pretrained weights that the options name into the bridge; most bridges have none.

        Constructors only fix shapes (reading at most a checkpoint's config); ``build_bridge``
        calls this afterwards. Loading a saved model skips it: its saved weights replace them.
        """

    def attach(self, lm: nn.Module) -> None:
        """Install modules inside the LM's layers; prefix bridges need nothing."""

    def layer_inputs(self, features: torch.Tensor, grid: tuple[int, int],
                     is_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch tensors that the bridge's modules inside the LM read; prefix bridges need none.

        ``features`` are the batch's encoder features ``(n_images, h*w, vision_dim)`` and
        ``is_image`` the ``(B, L)`` image-token positions. The model passes the result as
        keyword arguments of the LM's forward and ``generate`` (see
        ``chiasm.bridges.layer_inputs``), so nothing about a batch is kept on the module:
        recomputation under activation checkpointing and beam search see their own call's
        tensors. Every tensor has the batch as its first dimension.
        """
        return {}

    def bypassed(self) -> AbstractContextManager[None]:
        """A context in which the LM computes what the bare LM computes on text.

        Prefix bridges and bridges that leave text-only calls untouched need nothing.
        """
        return nullcontext()

    def export_state(self, lm: nn.Module) -> dict[str, torch.Tensor]:
        """The weights to save beside a LoRA-merged copy of ``lm`` (see ``VisionLanguageModel.save``)."""
        return self.state_dict()


BRIDGES: Registry[Bridge] = Registry("bridge")


def build_bridge(cfg: BridgeConfig, vision_dim: int, lm_dim: int, *, pretrained: bool = True) -> Bridge:
    """Instantiate the bridge named in ``cfg`` with its options.

    ``pretrained=False`` skips copying pretrained weights (see ``Bridge.init_pretrained``),
    for callers that load the bridge's own saved weights next.
    """
    import chiasm.bridges  # noqa: F401  (registration)
    from chiasm.options import check_options, option_types

    cls = BRIDGES.get(cfg.name)
    options = check_options("bridge", cfg.name, cfg.options, option_types(cls, skip=("vision_dim", "lm_dim")))
    try:
        bridge = cls(vision_dim, lm_dim, **options)
    except TypeError as exc:
        raise ValueError(f"bridge {cfg.name!r}: bad options {cfg.options}: {exc}") from None
    if pretrained:
        bridge.init_pretrained()
    return bridge
