"""LoRA targets default to the LM's own linear layers (all but the output head), for any family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chiasm.config import ModelConfig, PolicyConfig
from chiasm.lm.layers import decoder_layers
from chiasm.model import VisionLanguageModel
from chiasm.testing import make_tiny_lm
from chiasm.train.policy import apply_policy, parameter_counts


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_lm(root / f, family=f) for f in ("gpt_neox", "phi3")}


def _model(config: ModelConfig, lm_dir: Path | None = None) -> VisionLanguageModel:
    if lm_dir is not None:
        config.lm.source = str(lm_dir)
    torch.manual_seed(0)
    return VisionLanguageModel.build(config)


def _adapted(module: torch.nn.Module) -> set[str]:
    """Leaf names of the modules that carry a LoRA adapter."""
    return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in module.named_parameters() if ".lora_A" in n}


@pytest.mark.parametrize(("family", "expected"), [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("gpt_neox", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
])
def test_default_lora_adapts_every_linear_layer_but_the_head(tiny_model_config, family_dirs, family, expected) -> None:
    model = _model(tiny_model_config, family_dirs.get(family))
    assert PolicyConfig().lora_targets is None
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=2))
    assert _adapted(model.lm) == expected
    head = model.base_lm.get_output_embeddings()
    assert not any("lora" in n for n, _ in head.named_parameters())
    layers = model.base_lm.config.num_hidden_layers
    # r * (in + out) per adapted linear layer, summed over the layers' linear layers.
    linears = [m for n, m in model.base_lm.named_modules() if n.rsplit(".", 1)[-1] in expected
               and hasattr(m, "base_layer")]
    assert len(linears) == layers * len(expected)
    assert parameter_counts(model)["lm"]["trainable"] == sum(
        2 * (m.base_layer.in_features + m.base_layer.out_features) for m in linears)


def test_explicit_targets_still_work(tiny_model_config, family_dirs) -> None:
    model = _model(tiny_model_config, family_dirs["phi3"])
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=2, lora_targets=["qkv_proj"]))
    assert _adapted(model.lm) == {"qkv_proj"}


def test_a_target_that_matches_nothing_names_the_linear_layers(tiny_model_config, family_dirs) -> None:
    model = _model(tiny_model_config, family_dirs["gpt_neox"])
    with pytest.raises(ValueError) as err:
        apply_policy(model, "lm", PolicyConfig(mode="lora", lora_targets=["q_proj", "dense"]))
    assert str(err.value) == (
        "lora_targets ['q_proj'] match no module of the lm (GPTNeoXForCausalLM); its linear layers are named: "
        "['dense', 'dense_4h_to_h', 'dense_h_to_4h', 'lm_head', 'query_key_value'] (the output head lm_head "
        "is left out of the default)")
    assert parameter_counts(model)["lm"]["trainable"] == 0  # nothing half-applied


def test_default_on_the_encoder_skips_attention_that_never_calls_its_linear(tiny_model) -> None:
    apply_policy(tiny_model, "encoder", PolicyConfig(mode="lora", lora_r=2))
    # nn.MultiheadAttention reads out_proj.weight directly, so an adapter there would do nothing.
    assert _adapted(tiny_model.encoder) == {"linear1", "linear2"}


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "phi3"])
def test_lora_layers_adapts_only_the_last_blocks(tiny_model_config, family_dirs, family) -> None:
    model = _model(tiny_model_config, family_dirs.get(family))
    layers = list(decoder_layers(model.lm))
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=2, lora_layers=1))
    adapted = {id(m) for m in model.lm.modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    in_last = {id(m) for m in layers[-1].modules()}
    assert adapted and adapted <= in_last
    every = PolicyConfig(mode="lora", lora_r=2)
    full = _model(tiny_model_config, family_dirs.get(family))
    apply_policy(full, "lm", every)
    # the last block's adapters are the same set as with every block adapted, the others have none
    assert parameter_counts(model)["lm"]["trainable"] * len(layers) == parameter_counts(full)["lm"]["trainable"]


def test_lora_layers_after_a_stage_with_every_block_adapted_trains_only_the_last(tiny_model_config) -> None:
    model = _model(tiny_model_config)
    layers = list(decoder_layers(model.lm))
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=2))
    every = parameter_counts(model)["lm"]["trainable"]
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=2, lora_layers=1))
    in_last = {id(p) for p in layers[-1].parameters()}
    trainable = [p for p in model.lm.parameters() if p.requires_grad]
    assert trainable and all(id(p) in in_last for p in trainable)
    assert parameter_counts(model)["lm"]["trainable"] * len(layers) == every
    with pytest.raises(ValueError, match=f"lora_layers = {len(layers) + 1} but the lm has"):
        apply_policy(model, "lm", PolicyConfig(mode="lora", lora_layers=len(layers) + 1))


def test_lora_layers_beyond_the_stack_is_an_error(tiny_model_config) -> None:
    model = _model(tiny_model_config)
    n = len(decoder_layers(model.lm))
    with pytest.raises(ValueError, match=f"lora_layers = {n + 1} but the lm has {n} blocks"):
        apply_policy(model, "lm", PolicyConfig(mode="lora", lora_layers=n + 1))


def test_lora_layers_below_one_is_a_config_error() -> None:
    from chiasm.config_checks import check_values

    with pytest.raises(ValueError, match="lora_layers"):
        check_values(PolicyConfig(mode="lora", lora_layers=0), "a stage's lm")


def test_lora_layers_on_the_encoder_adapts_its_last_blocks(tiny_model) -> None:
    blocks = tiny_model.encoder.blocks()
    assert len(blocks) > 1
    apply_policy(tiny_model, "encoder", PolicyConfig(mode="lora", lora_r=2, lora_layers=1))
    adapted = {id(p) for n, p in tiny_model.encoder.named_parameters() if "lora_" in n}
    assert adapted and adapted <= {id(p) for p in blocks[-1].parameters()}
    assert all(p.requires_grad == (id(p) in adapted) for p in tiny_model.encoder.parameters())
