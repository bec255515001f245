"""Which modules get LoRA adapters: by default every linear layer the component calls.

Attention and MLP projections are named differently per family (Llama ``q_proj``...,
Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-NeoX ``query_key_value``/``dense``), so a default
list of names fits one family and silently misses the others. The default here is the
rule of peft's ``"all-linear"``: the leaf names of all linear layers except the output
head. An explicit list is kept as given, but a name that matches no module is an error
that lists the names that would.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from chiasm.lm.layers import unwrap_peft


def linear_layer_names(module: nn.Module) -> set[str]:
    """Leaf names of the linear layers in ``module`` whose forward is actually called.

    ``nn.MultiheadAttention`` reads its ``out_proj`` weight directly, so an adapter there
    would never run: those are left out.
    """
    skip = {id(child) for m in module.modules() if isinstance(m, nn.MultiheadAttention) for child in m.children()}
    return {name.rsplit(".", 1)[-1] for name, m in module.named_modules()
            if isinstance(m, nn.Linear | Conv1D) and id(m) not in skip and name}


def _head_name(module: nn.Module) -> str | None:
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is None:
        return None
    return next((name.rsplit(".", 1)[-1] for name, m in module.named_modules() if m is head), None)


def lora_targets(module: nn.Module, targets: list[str] | None, component: str) -> list[str]:
    """The ``target_modules`` for peft: ``targets`` checked, or all linear layers but the head."""
    base = unwrap_peft(module)
    linear = linear_layer_names(base)
    head = _head_name(base)
    if targets is None:
        chosen = sorted(linear - {head})
        if not chosen:
            raise ValueError(f"the {component} ({type(base).__name__}) has no linear layer to put LoRA on")
        return chosen
    names = [name for name, _ in base.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        note = f" (the output head {head} is left out of the default)" if head else ""
        raise ValueError(f"lora_targets {missing} match no module of the {component} ({type(base).__name__}); "
                         f"its linear layers are named: {sorted(linear)}{note}")
    return list(targets)
