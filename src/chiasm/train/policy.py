"""Per-component training policies: frozen, full, LoRA (peft) or last-N blocks.

A stage applies one policy to each of encoder, bridge and LM (and the audio bridge of a model
that hears; its Whisper encoder is always frozen), then logs exactly how many parameters each
component trains and freezes, so a run's log shows what a stage did.
"""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn

from chiasm.config import PolicyConfig
from chiasm.lm.layers import decoder_layers, final_norm, unwrap_peft
from chiasm.model import VisionLanguageModel
from chiasm.train.lora_targets import lora_targets

log = logging.getLogger(__name__)
COMPONENTS = ("encoder", "bridge", "lm", "audio_bridge")
BRIDGES = ("bridge", "audio_bridge")


def _blocks(model: VisionLanguageModel, component: str) -> list[nn.Module]:
    """The LM's decoder layers or the encoder's trunk blocks, in order."""
    return list(decoder_layers(model.lm)) if component == "lm" else model.encoder.blocks()


def _last_blocks(model: VisionLanguageModel, component: str, n: int | None) -> list[nn.Module] | None:
    """The last ``n`` blocks of ``component`` (None for None: every block); more than it has is an error."""
    if n is None:
        return None
    blocks = _blocks(model, component)
    if n > len(blocks):
        raise ValueError(f"lora_layers = {n} but the {component} has {len(blocks)} blocks")
    return blocks[-n:]


def _lora_config(policy: PolicyConfig, module: nn.Module, component: str,
                 last: list[nn.Module] | None) -> LoraConfig:
    targets = lora_targets(module, policy.lora_targets, component)
    if last is not None:
        targets = _in_blocks(module, targets, last, component)
    return LoraConfig(r=policy.lora_r, lora_alpha=policy.lora_alpha, lora_dropout=policy.lora_dropout,
                      target_modules=targets, bias="none")


def _in_blocks(module: nn.Module, targets: list[str], blocks: list[nn.Module], component: str) -> list[str]:
    """The full names of the ``targets`` modules inside ``blocks`` (peft matches them exactly).

    Named by the module objects rather than by a layer-name pattern, so any family's stack
    (``model.layers``, ``gpt_neox.layers``, ``transformer.h``) works the same way.
    """
    kept = {id(m) for block in blocks for m in block.modules()}
    wanted = set(targets)
    names = [name for name, m in unwrap_peft(module).named_modules()
             if id(m) in kept and name.rsplit(".", 1)[-1] in wanted]
    if not names:
        raise ValueError(f"no module named {sorted(wanted)} in the last {len(blocks)} blocks of the {component}")
    return names


def _has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def apply_policy(model: VisionLanguageModel, component: str, policy: PolicyConfig) -> None:
    """Set ``requires_grad`` (and add LoRA adapters if asked) for one component."""
    module: nn.Module = getattr(model, component)
    for p in module.parameters():
        p.requires_grad_(False)
    if policy.mode == "frozen":
        return
    if policy.mode == "full":
        for p in module.parameters():
            p.requires_grad_(True)
        return
    if policy.mode == "last_n":
        if component in BRIDGES:
            raise ValueError(f"the last_n policy applies to the encoder or the LM, not the {component}")
        for block in _blocks(model, component)[-policy.last_n:]:
            for p in block.parameters():
                p.requires_grad_(True)
        if component == "lm":
            norm = final_norm(model.lm)
            if norm is not None:
                for p in norm.parameters():
                    p.requires_grad_(True)
        return
    if policy.mode == "lora":
        if component in BRIDGES:
            raise ValueError(f"LoRA applies to the encoder or the LM; train the {component} with 'full'")
        last = _last_blocks(model, component, policy.lora_layers)
        if component == "lm":
            if not isinstance(model.lm, PeftModel):
                model.lm = get_peft_model(model.lm, _lora_config(policy, model.lm, component, last))
        elif not _has_lora(module):
            inject_adapter_in_model(_lora_config(policy, module, component, last), module)
        # Adapters an earlier stage put in every block stay, but only the last N train here
        # (the blocks are the same modules after injection, now holding their adapters).
        allowed = None if last is None else {id(p) for block in last for p in block.parameters()}
        for name, p in getattr(model, component).named_parameters():
            p.requires_grad_("lora_" in name and (allowed is None or id(p) in allowed))
        return
    raise ValueError(f"unknown policy mode {policy.mode!r}")


def set_train_modes(model: VisionLanguageModel, policies: dict[str, PolicyConfig]) -> None:
    """Train mode exactly where a policy trains: dropout (LoRA's included) acts only there.

    A transformers LM loads in eval mode and an evaluation leaves it there, so without this
    a trained LM would run with its dropout off; a frozen part in train mode would instead
    see dropout noise it never learns from. ``last_n`` trains only its blocks (and the final
    norm), so only those go to train mode.
    """
    model.eval()
    for comp in (c for c in COMPONENTS if c in policies):
        policy = policies[comp]
        module: nn.Module = getattr(model, comp)
        if policy.mode in ("full", "lora"):
            module.train()
        elif policy.mode == "last_n":
            blocks = _blocks(model, comp)
            norm = final_norm(model.lm) if comp == "lm" else None
            for part in [*blocks[-policy.last_n:], *([norm] if norm is not None else [])]:
                part.train()


def apply_stage_policies(model: VisionLanguageModel, policies: dict[str, PolicyConfig]) -> dict[str, dict[str, int]]:
    """Apply every component's policy; return and log trainable/frozen counts per component."""
    given = [c for c in COMPONENTS if c in policies]  # the audio bridge's may be left out: it stays as it is
    for comp in given:
        apply_policy(model, comp, policies[comp])
    counts = parameter_counts(model)
    for comp in (c for c in given if c in counts):  # no audio-bridge line for a model that does not hear
        c = counts[comp]
        log.info("%-12s %-6s trainable %12s  frozen %12s", comp, policies[comp].mode,
                 f"{c['trainable']:,}", f"{c['frozen']:,}")
    return counts


def parameter_counts(model: VisionLanguageModel) -> dict[str, dict[str, int]]:
    out = {}
    for comp in COMPONENTS:
        if comp == "audio_bridge" and model.audio_encoder is None:
            continue
        params = list(getattr(model, comp).parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        out[comp] = {"trainable": trainable, "frozen": sum(p.numel() for p in params) - trainable}
    return out
