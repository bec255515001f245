"""The vision towers a LLaVA checkpoint and chiasm's ``hf-vision`` encoder both read, one table.

LLaVA picks the tower's features with ``vision_feature_select_strategy``: "default" drops the
first token (CLIP's class token), "full" keeps every token. chiasm's encoder always gives the
patch grid alone, so the strategy that matches is the one that removes exactly the tower's
leading non-grid tokens: "default" for CLIP (one class token), "full" for SigLIP (none).
"""

from __future__ import annotations

# vision config model_type -> tokens before the patch grid
LEADING_TOKENS: dict[str, int] = {"clip_vision_model": 1, "siglip_vision_model": 0}
STRATEGY = {1: "default", 0: "full"}


def tower_problem(model_type: str) -> str | None:
    """Why a tower of ``model_type`` cannot sit in a LLaVA checkpoint that chiasm reads or writes; None if it can."""
    if model_type in LEADING_TOKENS:
        return None
    return (f"vision tower model_type {model_type!r}: LLaVA checkpoints here hold a CLIP or SigLIP tower "
            f"({', '.join(LEADING_TOKENS)})")


def strategy_for(model_type: str) -> str:
    """The ``vision_feature_select_strategy`` that leaves exactly the patch grid of this tower."""
    return STRATEGY[LEADING_TOKENS[model_type]]
