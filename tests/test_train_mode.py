"""Train/eval mode: a component is in train mode exactly while its policy trains it."""

from __future__ import annotations

import torch
from torch import nn

from chiasm.config import PolicyConfig, RunConfig, StageConfig
from chiasm.model import VisionLanguageModel
from chiasm.testing import randomise_lora
from chiasm.train.policy import COMPONENTS, apply_stage_policies, set_train_modes
from chiasm.train.trainer import Trainer


def _flags(module: nn.Module) -> set[bool]:
    return {m.training for m in module.modules()}


def _policies(**modes: PolicyConfig) -> dict[str, PolicyConfig]:
    return {"encoder": PolicyConfig(mode="frozen"), "bridge": PolicyConfig(mode="full"),
            "lm": PolicyConfig(mode="frozen"), **modes}


def test_training_step_sees_lora_lm_in_train_mode_and_frozen_encoder_in_eval(tiny_model_config, tiny_world,
                                                                             tmp_path) -> None:
    lora = PolicyConfig(mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.5)
    cfg = RunConfig(model=tiny_model_config, output_dir=str(tmp_path / "run"), precision="fp32", stages=[
        StageConfig(name="align", data=str(tiny_world.align), max_steps=1, batch_size=4),
        StageConfig(name="instruct", data=str(tiny_world.instruct), lm=lora, max_steps=2, batch_size=4)])
    trainer = Trainer(cfg, show_progress=False)
    model = trainer.model
    seen: list[dict[str, set[bool]]] = []
    model.base_lm.get_decoder().layers[0].register_forward_hook(
        lambda *_: seen.append({c: _flags(getattr(model, c)) for c in COMPONENTS if c != "audio_bridge"}))
    trainer.run()
    # align: 1 step, the LM frozen (eval, so frozen dropout stays off); instruct: 2 steps, LoRA trains.
    assert seen == [{"encoder": {False}, "bridge": {True}, "lm": {False}}] + \
        [{"encoder": {False}, "bridge": {True}, "lm": {True}}] * 2
    assert _flags(model) == {False}  # back in eval mode after the run


def test_lora_dropout_acts_only_in_train_mode(tiny_model: VisionLanguageModel) -> None:
    policies = _policies(lm=PolicyConfig(mode="lora", lora_r=4, lora_dropout=0.5))
    apply_stage_policies(tiny_model, policies)
    torch.manual_seed(1)
    randomise_lora(tiny_model.lm, std=1.0)  # LoRA's B starts at zero, which would hide any dropout
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return tiny_model(ids, mask, return_logits=True).logits

    tiny_model.eval()
    set_train_modes(tiny_model, policies)
    assert not torch.equal(logits(), logits())
    tiny_model.eval()
    torch.testing.assert_close(logits(), logits(), rtol=0, atol=0)


def test_last_n_puts_only_the_trained_blocks_in_train_mode(tiny_model: VisionLanguageModel) -> None:
    policies = _policies(encoder=PolicyConfig(mode="last_n", last_n=1), lm=PolicyConfig(mode="last_n", last_n=1))
    apply_stage_policies(tiny_model, policies)
    tiny_model.train()  # every flag starts wrong
    set_train_modes(tiny_model, policies)
    layers = tiny_model.base_lm.model.layers
    assert _flags(layers[1]) == {True} and _flags(tiny_model.base_lm.model.norm) == {True}
    assert _flags(layers[0]) == {False} and not tiny_model.base_lm.model.embed_tokens.training
    assert _flags(tiny_model.encoder.layers[1]) == {True} and _flags(tiny_model.encoder.layers[0]) == {False}
    assert _flags(tiny_model.bridge) == {True}
