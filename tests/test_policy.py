"""Training policies: which parameters each mode trains, and what it refuses."""

from __future__ import annotations

import pytest
from peft import PeftModel

from chiasm.config import PolicyConfig
from chiasm.model import VisionLanguageModel
from chiasm.train.policy import apply_policy, apply_stage_policies, parameter_counts


def _total(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _trainable_names(module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _policies(encoder: str = "frozen", bridge: str = "full", lm: str = "frozen", **lm_kw) -> dict[str, PolicyConfig]:
    return {"encoder": PolicyConfig(mode=encoder), "bridge": PolicyConfig(mode=bridge),
            "lm": PolicyConfig(mode=lm, **lm_kw)}


def test_frozen_and_full_counts(tiny_model: VisionLanguageModel) -> None:
    totals = {c: _total(getattr(tiny_model, c)) for c in ("encoder", "bridge", "lm")}
    counts = apply_stage_policies(tiny_model, _policies("frozen", "full", "frozen"))
    assert counts == {"encoder": {"trainable": 0, "frozen": totals["encoder"]},
                      "bridge": {"trainable": totals["bridge"], "frozen": 0},
                      "lm": {"trainable": 0, "frozen": totals["lm"]}}
    counts = apply_stage_policies(tiny_model, _policies("full", "frozen", "full"))
    assert counts == {"encoder": {"trainable": totals["encoder"], "frozen": 0},
                      "bridge": {"trainable": 0, "frozen": totals["bridge"]},
                      "lm": {"trainable": totals["lm"], "frozen": 0}}
    assert counts == parameter_counts(tiny_model)


def test_lora_on_lm_trains_only_adapters(tiny_model: VisionLanguageModel) -> None:
    lm_total = _total(tiny_model.lm)
    counts = apply_stage_policies(tiny_model, _policies(lm="lora", lora_r=8))
    assert isinstance(tiny_model.lm, PeftModel)
    # Tiny Llama: hidden 64, 4 heads of 16, 2 KV heads -> k/v project 64 -> 32, MLP 64 -> 128 -> 64.
    # The default adapts every linear layer but the head. Per layer, r * (in + out):
    # q: 8 * (64 + 64), k: 8 * (64 + 32), v: 8 * (64 + 32), o: 8 * (64 + 64) = 3584;
    # gate, up, down: 3 * 8 * (64 + 128) = 4608; two layers.
    assert counts["lm"] == {"trainable": 2 * (3584 + 4608), "frozen": lm_total}
    names = _trainable_names(tiny_model.lm)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # The model still finds the transformers LM underneath the wrapper.
    assert not isinstance(tiny_model.base_lm, PeftModel)
    assert tiny_model.base_lm.model.layers[0].self_attn.q_proj is not None


def test_lora_targets_are_respected(tiny_model: VisionLanguageModel) -> None:
    counts = apply_stage_policies(tiny_model, _policies(lm="lora", lora_r=2, lora_targets=["v_proj"]))
    assert counts["lm"]["trainable"] == 2 * 2 * (64 + 32)


def test_lora_twice_does_not_double_wrap(tiny_model: VisionLanguageModel) -> None:
    apply_stage_policies(tiny_model, _policies(lm="lora"))
    first = tiny_model.lm
    n_params = len(list(first.named_parameters()))
    trainable = parameter_counts(tiny_model)["lm"]["trainable"]
    apply_stage_policies(tiny_model, _policies(lm="lora"))
    assert tiny_model.lm is first
    assert not isinstance(tiny_model.lm.get_base_model(), PeftModel)
    assert len(list(tiny_model.lm.named_parameters())) == n_params
    assert parameter_counts(tiny_model)["lm"]["trainable"] == trainable
    # Freezing after LoRA freezes the adapters too; LoRA again re-enables exactly them.
    apply_stage_policies(tiny_model, _policies(lm="frozen"))
    assert parameter_counts(tiny_model)["lm"]["trainable"] == 0
    apply_stage_policies(tiny_model, _policies(lm="lora"))
    assert parameter_counts(tiny_model)["lm"]["trainable"] == trainable


def test_lora_on_encoder_once(tiny_model: VisionLanguageModel) -> None:
    policy = PolicyConfig(mode="lora", lora_r=2, lora_targets=["linear1", "linear2"])
    total = _total(tiny_model.encoder)
    apply_policy(tiny_model, "encoder", policy)
    # tiny-vit width 32, MLP 64: linear1 32 -> 64, linear2 64 -> 32; r * (in + out) each, two blocks.
    expected = 2 * (2 * (32 + 64) + 2 * (64 + 32))
    assert parameter_counts(tiny_model)["encoder"] == {"trainable": expected, "frozen": total}
    apply_policy(tiny_model, "encoder", policy)
    assert parameter_counts(tiny_model)["encoder"] == {"trainable": expected, "frozen": total}


@pytest.mark.parametrize("n", [1, 2])
def test_last_n_on_lm(tiny_model: VisionLanguageModel, n: int) -> None:
    layers = tiny_model.base_lm.model.layers
    expected = sum(_total(layer) for layer in layers[-n:]) + _total(tiny_model.base_lm.model.norm)
    counts = apply_stage_policies(tiny_model, _policies(lm="last_n", last_n=n))
    assert counts["lm"] == {"trainable": expected, "frozen": _total(tiny_model.lm) - expected}
    first_trained = len(layers) - n
    for name in _trainable_names(tiny_model.lm):
        assert name.startswith("model.norm.") or any(
            name.startswith(f"model.layers.{i}.") for i in range(first_trained, len(layers))), name
    assert not tiny_model.lm.get_input_embeddings().weight.requires_grad


def test_last_n_on_encoder(tiny_model: VisionLanguageModel) -> None:
    apply_policy(tiny_model, "encoder", PolicyConfig(mode="last_n", last_n=1))
    names = _trainable_names(tiny_model.encoder)
    assert names and all(n.startswith("layers.1.") for n in names)
    assert parameter_counts(tiny_model)["encoder"]["trainable"] == _total(tiny_model.encoder.layers[1])


@pytest.mark.parametrize(("mode", "match"), [("lora", "LoRA"), ("last_n", "last_n")])
def test_bridge_rejects_lora_and_last_n(tiny_model: VisionLanguageModel, mode: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_policy(tiny_model, "bridge", PolicyConfig(mode=mode))  # type: ignore[arg-type]


def test_unknown_mode_is_rejected(tiny_model: VisionLanguageModel) -> None:
    with pytest.raises(ValueError, match="unknown policy mode"):
        apply_policy(tiny_model, "lm", PolicyConfig(mode="half"))  # type: ignore[arg-type]
