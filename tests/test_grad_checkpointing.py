"""Activation checkpointing (ModelConfig.gradient_checkpointing): same gradients, layers recomputed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from chiasm.config import (
    BridgeConfig,
    ConfigError,
    EncoderConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
    StageConfig,
    from_dict,
)
from chiasm.data.llava import load_llava
from chiasm.model import VisionLanguageModel
from chiasm.train.batches import collate, prepare
from chiasm.train.policy import apply_stage_policies
from chiasm.train.trainer import Trainer

BRIDGES = {"mlp": {}, "visual_expert": {}, "gated_xattn": {"every": 1, "num_latents": 4, "heads": 4}}


class Calls:
    """Counts the calls of a module (a recomputed layer runs twice per step).

    A pre-hook: the backward's recomputation may stop inside a module once it has what it
    needs (non-reentrant checkpointing), before a forward hook would run.
    """

    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *_: object) -> None:
        self.n += 1


def _model(cfg: ModelConfig, checkpointing: bool, policies: dict[str, PolicyConfig]) -> VisionLanguageModel:
    cfg = copy.deepcopy(cfg)
    cfg.gradient_checkpointing = checkpointing
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg)
    apply_stage_policies(model, policies)
    torch.manual_seed(1)
    with torch.no_grad():  # away from the identity start, so every trainable part gets a gradient
        for name, p in model.named_parameters():
            if name.startswith("bridge.blocks.") and ".gate_" in name:
                p.fill_(0.5)
            elif "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def _loss(model: VisionLanguageModel, world) -> torch.Tensor:
    samples = load_llava(world.instruct).samples[:2]
    prepared, _ = prepare(samples, model)
    batch = collate(prepared, model.tokenizer.pad_token_id, model=model)
    return model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss


def _gradients(model: VisionLanguageModel, world) -> dict[str, torch.Tensor]:
    _loss(model, world).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_same(plain: dict[str, torch.Tensor], recomputed: dict[str, torch.Tensor]) -> None:
    assert plain and plain.keys() == recomputed.keys()
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("lm_mode", ["full", "lora"])
@pytest.mark.parametrize("bridge", sorted(BRIDGES))
def test_same_gradients_with_and_without_checkpointing(tiny_model_config: ModelConfig, tiny_world, bridge: str,
                                                        lm_mode: str) -> None:
    tiny_model_config.bridge = BridgeConfig(bridge, dict(BRIDGES[bridge]))
    policies = {"encoder": PolicyConfig(mode="frozen"), "bridge": PolicyConfig(mode="full"),
                "lm": PolicyConfig(mode=lm_mode, lora_r=4)}
    grads, calls = {}, {}
    for checkpointing in (False, True):
        model = _model(tiny_model_config, checkpointing, policies)
        layer = model.base_lm.model.layers[0]
        counters = [Calls(layer.mlp)]
        if bridge == "gated_xattn":
            counters.append(Calls(model.bridge.blocks[0]))
        if bridge == "visual_expert":
            counters.append(Calls(model.bridge.experts[0]["mlp"]))
        grads[checkpointing] = _gradients(model, tiny_world)
        calls[checkpointing] = [c.n for c in counters]
    _assert_same(grads[False], grads[True])
    assert any(n.startswith("bridge.") for n in grads[True]) and any(n.startswith("lm.") for n in grads[True])
    # Each counted module ran once without checkpointing and again in the backward pass with it.
    assert calls[False] == [1] * len(calls[False]) and calls[True] == [2] * len(calls[True])


def test_a_trainable_transformers_tower_is_checkpointed(tiny_model_config: ModelConfig, tiny_world,
                                                        tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=64, patch_size=16)).save_pretrained(tmp_path)
    tiny_model_config.encoder = EncoderConfig(name="hf-vision", source=str(tmp_path), image_size=64,
                                             options={"normalize": "clip"})
    policies = {"encoder": PolicyConfig(mode="full"), "bridge": PolicyConfig(mode="full"),
                "lm": PolicyConfig(mode="frozen")}
    grads, calls = {}, {}
    for checkpointing in (False, True):
        model = _model(tiny_model_config, checkpointing, policies)
        counter = Calls(model.encoder.tower.encoder.layers[0].mlp)
        grads[checkpointing] = _gradients(model, tiny_world)
        calls[checkpointing] = counter.n
    _assert_same(grads[False], grads[True])
    assert any(n.startswith("encoder.") for n in grads[True])
    assert calls == {False: 1, True: 2}


def test_the_trainer_runs_the_lm_checkpointed(tiny_model_config: ModelConfig, tiny_world, tmp_path: Path) -> None:
    tiny_model_config.gradient_checkpointing = True
    cfg = RunConfig(model=tiny_model_config, output_dir=str(tmp_path / "run"), precision="fp32", stages=[
        StageConfig(name="instruct", data=str(tiny_world.instruct), lm=PolicyConfig(mode="lora", lora_r=4),
                    max_steps=2, batch_size=2)])
    torch.manual_seed(0)
    trainer = Trainer(cfg, show_progress=False)
    counter = Calls(trainer.model.base_lm.model.layers[0].mlp)
    trainer.run()
    assert counter.n == 2 * 2  # two steps, each layer run forward and again in backward
    assert not trainer.model.lm.training  # evaluation mode after the stage, as before


def test_the_switch_is_a_typed_config_field() -> None:
    assert ModelConfig().gradient_checkpointing is False
    assert from_dict(ModelConfig, {"gradient_checkpointing": True}).gradient_checkpointing is True
    with pytest.raises(ConfigError, match="gradient_checkpointing: expected bool"):
        from_dict(ModelConfig, {"gradient_checkpointing": "yes"})
