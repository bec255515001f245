"""Every registered bridge inside a whole model: tokens, gradients, cached generation, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chiasm.bridges import BRIDGES
from chiasm.config import BridgeConfig, ModelConfig, PolicyConfig
from chiasm.data.llava import load_llava
from chiasm.model import VisionLanguageModel
from chiasm.train.batches import collate, prepare
from chiasm.train.policy import apply_stage_policies

# The tiny encoder yields a 4 x 4 grid.
EXPECTED_TOKENS = {"linear": 16, "mlp": 16, "pixel_shuffle": 4, "pooling": 4,
                   "c_abstractor": 16, "resampler": 16, "perceiver": 16, "qformer": 32,
                   "gated_xattn": 1, "visual_expert": 16}


def test_every_registered_bridge_is_covered() -> None:
    assert set(BRIDGES.names()) == set(EXPECTED_TOKENS)


@pytest.fixture(params=sorted(EXPECTED_TOKENS))
def model(request, tiny_model_config: ModelConfig) -> VisionLanguageModel:
    tiny_model_config.bridge = BridgeConfig(name=request.param)
    torch.manual_seed(0)
    return VisionLanguageModel.build(tiny_model_config)


def _batch(model: VisionLanguageModel, world, *, generation: bool):
    samples = load_llava(world.eval if generation else world.instruct).samples[:2]
    prepared, _ = prepare(samples, model, for_generation=generation)
    return collate(prepared, model.tokenizer.pad_token_id, left_pad=generation, model=model)


def test_bridge_tokens_gradients_cache_and_round_trip(model: VisionLanguageModel, tiny_world, tmp_path: Path) -> None:
    name = model.config.bridge.name
    assert model.tokens_per_image == EXPECTED_TOKENS[name]
    apply_stage_policies(model, {"encoder": PolicyConfig(mode="frozen"), "bridge": PolicyConfig(mode="full"),
                                 "lm": PolicyConfig(mode="frozen")})
    if name == "gated_xattn":  # gates start at 0 (identity); open them so every parameter is exercised
        with torch.no_grad():
            for block in model.bridge.blocks:
                block.gate_attn.fill_(0.5)
                block.gate_ff.fill_(0.5)
    batch = _batch(model, tiny_world, generation=False)
    assert int((batch.input_ids == model.image_token_id).sum()) == 2 * EXPECTED_TOKENS[name]
    model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss.backward()
    no_grad = {n for n, p in model.bridge.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    if name == "visual_expert":
        # In the last layer an image token's query, output projection and MLP only shape its own
        # final state, which no loss reads; its keys and values do reach the text.
        last = len(model.bridge.experts) - 1
        assert no_grad == {n for n, _ in model.bridge.named_parameters()
                           if n.startswith((f"experts.{last}.q_proj", f"experts.{last}.o_proj", f"experts.{last}.mlp"))}
    else:
        assert not no_grad
    assert all(p.grad is None for p in [*model.lm.parameters(), *model.encoder.parameters()])

    model.eval()
    gen = _batch(model, tiny_world, generation=True)
    kwargs = {"pixels": gen.pixels, "max_new_tokens": 8}
    assert model.generate(gen.input_ids, gen.attention_mask, use_cache=True, **kwargs) == \
        model.generate(gen.input_ids, gen.attention_mask, use_cache=False, **kwargs)

    with torch.no_grad():
        before = model(gen.input_ids, gen.attention_mask, pixels=gen.pixels).logits
        loaded = VisionLanguageModel.load(model.save(tmp_path / name))
        after = loaded(gen.input_ids, gen.attention_mask, pixels=gen.pixels).logits
    assert torch.equal(before, after)
