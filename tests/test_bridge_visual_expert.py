"""CogVLM-style visual expert: image tokens use their own weights, text keeps the LM's."""

from __future__ import annotations

import pytest
import torch

from chiasm.bridges.layer_inputs import IMAGE_POSITIONS
from chiasm.config import BridgeConfig, ModelConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.model import VisionLanguageModel
from chiasm.train.trainer import Trainer


@pytest.fixture
def model_config(tiny_model_config: ModelConfig) -> ModelConfig:
    tiny_model_config.bridge = BridgeConfig("visual_expert")
    return tiny_model_config


def test_experts_start_as_copies_of_the_lm(model_config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(model_config).eval()
    layer0 = model.base_lm.model.layers[0]
    assert torch.equal(model.bridge.experts[0]["q_proj"].weight, layer0.self_attn.q_proj.weight)
    assert model.bridge.experts[0]["q_proj"].weight.data_ptr() != layer0.self_attn.q_proj.weight.data_ptr()
    img = model.image_token_id
    ids = torch.tensor([[5, 6] + [img] * 16 + [7, 8]])
    with torch.no_grad():
        embeds, layer_inputs = model.lm_inputs(ids, torch.randn(1, 16, model.encoder.dim))
        assert layer_inputs[IMAGE_POSITIONS].tolist() == [[False] * 2 + [True] * 16 + [False] * 2]
        with_experts = model.lm(inputs_embeds=embeds, **layer_inputs).logits
        bare = model.lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(with_experts, bare, rtol=0, atol=1e-5)


def test_frozen_lm_text_logits_stay_identical_after_training(model_config: ModelConfig, tiny_world, tmp_path) -> None:
    frozen = PolicyConfig(mode="frozen")
    cfg = RunConfig(model=model_config, output_dir=str(tmp_path / "run"), precision="fp32", stages=[
        StageConfig(name="instruct", data=str(tiny_world.instruct), encoder=frozen, lm=frozen, max_steps=3,
                    batch_size=4, lr=1e-2)])
    torch.manual_seed(0)
    trainer = Trainer(cfg, show_progress=False)
    model = trainer.model
    text = torch.tensor([[5, 6, 7, 8, 9, 10]])
    expert_before = model.bridge.experts[0]["mlp"].down_proj.weight.clone()
    with torch.no_grad():
        before = model.lm(input_ids=text).logits
    trainer.run()
    assert not torch.equal(model.bridge.experts[0]["mlp"].down_proj.weight, expert_before)  # experts learned
    with torch.no_grad():
        after = model.lm(input_ids=text).logits
    assert torch.equal(before, after)
