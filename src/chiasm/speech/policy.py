"""What a speech stage trains: every weight, the decoder alone, or LoRA adapters.

One log line says how many parameters train and how many stay frozen, as the VLM's stages do.
"""

from __future__ import annotations

import logging

from torch import nn

from chiasm.lm.layers import unwrap_peft
from chiasm.speech.config import SpeechStage

log = logging.getLogger(__name__)


def apply_mode(model: nn.Module, stage: SpeechStage) -> nn.Module:
    """Set ``requires_grad`` for the stage's mode; LoRA wraps the model (returned) the first time."""
    if stage.mode == "lora":
        from peft import LoraConfig, get_peft_model

        if not hasattr(model, "peft_config"):
            # Decoder-only unless lora_encoder: module names under model.decoder (or model.encoder too).
            sides = ("decoder", "encoder") if stage.lora_encoder else ("decoder",)
            targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                       and _named(n, stage.lora_targets) and any(f"model.{s}." in n for s in sides)]
            if not targets:
                raise ValueError(f"stage {stage.name!r}: no linear layer named {stage.lora_targets} for LoRA")
            model = get_peft_model(model, LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha,
                                                     target_modules=targets, lora_dropout=0.0))
        for n, p in model.named_parameters():
            p.requires_grad = "lora_" in n
    else:
        for n, p in unwrap_peft(model).named_parameters():  # full: everything; frozen_encoder: all but the encoder
            p.requires_grad = stage.mode == "full" or not n.startswith("model.encoder.")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("stage %s (%s): trains %.2fM parameters, freezes %.2fM", stage.name, stage.mode, trained / 1e6,
             frozen / 1e6)
    return model


def _named(name: str, targets: list[str]) -> bool:
    """A target names a layer by its last parts: ``k_proj`` is every attention's, ``self_attn.k_proj`` only
    the self-attention's (leaving cross-attention's keys and values, computed over all 1,500 encoder
    frames, frozen and cheap)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def encoder_trains(model: nn.Module) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if ".encoder." in n or n.startswith("encoder."))


def plain_model(model: nn.Module) -> nn.Module:
    """The transformers model with any LoRA adapters merged in (what is saved)."""
    if hasattr(model, "peft_config"):
        return model.merge_and_unload()
    return model
