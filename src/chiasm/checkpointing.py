"""Activation (gradient) checkpointing: recompute layer activations in the backward pass.

Switched on by ``ModelConfig.gradient_checkpointing``. The LM and a transformers vision
tower checkpoint each of their layers with transformers' own mechanism, non-reentrant
(``torch.utils.checkpoint(..., use_reentrant=False)``), which needs no input that requires
grad and works with frozen layers under LoRA. A layer recomputes only while its module is
in training mode, so the trainer puts the LM in training mode for its stages.
"""

from __future__ import annotations

import functools
import logging

from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

log = logging.getLogger(__name__)
CHECKPOINT_KWARGS = {"use_reentrant": False}


def enable_lm_checkpointing(lm: PreTrainedModel) -> None:
    """Checkpoint every decoder layer of a transformers LM, or say clearly that it cannot."""
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(lm).__name__} does not support activation checkpointing")
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    else:  # transformers releases before the rename
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))


def disable_lm_checkpointing(lm: PreTrainedModel) -> None:
    """Switch a transformers LM's activation checkpointing off, under either of its names."""
    disable = getattr(lm, "activation_checkpointing_disable", None)
    (disable or lm.gradient_checkpointing_disable)()  # the second: transformers releases before the rename


def enable_module_checkpointing(module: nn.Module) -> int:
    """Checkpoint the transformers layers inside ``module`` (e.g. a tower's ``vision_model``).

    Works on a part of a transformers model that is not itself a ``PreTrainedModel``, by
    the same flags transformers sets: layers with a ``gradient_checkpointing`` attribute
    checkpoint through ``_gradient_checkpointing_func``. Returns how many modules took it.
    """
    func = functools.partial(checkpoint, **CHECKPOINT_KWARGS)
    count = 0
    for sub in module.modules():
        if hasattr(sub, "gradient_checkpointing"):
            sub._gradient_checkpointing_func = func
            sub.gradient_checkpointing = True
            count += 1
    return count


def enable_checkpointing(lm: PreTrainedModel, encoder: nn.Module) -> None:
    """Checkpoint the LM and, where it has the mode, the vision encoder (see ``VisionEncoder``)."""
    enable_lm_checkpointing(lm)
    if not encoder.enable_checkpointing():
        # A frozen encoder keeps no activations for the backward pass anyway.
        log.info("gradient_checkpointing: encoder %s has no checkpointing mode; a trainable one keeps its "
                 "activations", type(encoder).__name__)
