"""Where a causal LM keeps its decoder layers, found the same way for every family.

transformers names the stack differently per family (``model.layers`` for Llama, Qwen2,
Phi-3; ``gpt_neox.layers``; ``transformer.h`` for GPT-2 and Falcon; ``model.decoder.layers``
for OPT), so no attribute path is assumed: the layers are the outermost ``nn.ModuleList``
of as many blocks as the config's ``num_hidden_layers``. Every part of chiasm
that needs the layers (the ``last_n`` policy, the in-LM bridges) asks this one function.
"""

from __future__ import annotations

from torch import nn


def unwrap_peft(lm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def _layer_count(lm: nn.Module) -> int | None:
    config = getattr(lm, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def _find(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    base = unwrap_peft(lm)
    n = _layer_count(base)
    # With a layer count, blocks may differ in class (hybrid attention/state-space stacks);
    # without one, only a list of identical blocks is taken for the decoder.
    found = [(name, m) for name, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and len(m)
             and (len(m) == n if n is not None else len({type(x) for x in m}) == 1)]
    if not found:
        what = (f"no nn.ModuleList of {n} blocks, the config's num_hidden_layers" if n is not None
                else "no nn.ModuleList of identical blocks, and no num_hidden_layers in a config")
        raise NotImplementedError(f"{type(base).__name__}: no decoder layers found ({what})")
    depth = min(name.count(".") for name, _ in found)
    outer = [(name, m) for name, m in found if name.count(".") == depth]
    if len(outer) > 1:
        raise NotImplementedError(f"{type(base).__name__}: several candidate decoder-layer lists "
                                  f"({', '.join(name for name, _ in outer)}); cannot tell which one is the decoder")
    return outer[0]


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's decoder layers, in order (through a peft wrapper too)."""
    return _find(lm)[1]


def final_norm(lm: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer: the first norm module registered after the layer list.

    Embedding norms (BLOOM's ``word_embeddings_layernorm``) come before the list, the final
    norm (``norm``, ``final_layer_norm``, ``ln_f``) after it.
    """
    base = unwrap_peft(lm)
    name, layers = _find(base)
    parent = base.get_submodule(name.rpartition(".")[0]) if "." in name else base
    children = list(parent.children())
    after = children[next(i for i, m in enumerate(children) if m is layers) + 1:]
    return next((m for m in after if "norm" in type(m).__name__.lower()), None)
