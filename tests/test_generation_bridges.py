"""Every bridge generates with the KV cache what it generates without it, in mixed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chiasm.bridges import BRIDGES
from chiasm.config import BridgeConfig, ModelConfig
from chiasm.data.sample import Sample, Turn
from chiasm.generation import Engine, Request, SamplingParams
from chiasm.model import VisionLanguageModel
from chiasm.testing import randomise_lora, spread_weights


@pytest.fixture(params=sorted(BRIDGES.names()))
def model(request, tiny_model_config: ModelConfig) -> VisionLanguageModel:
    tiny_model_config.bridge = BridgeConfig(name=request.param)
    torch.manual_seed(0)
    return spread_weights(VisionLanguageModel.build(tiny_model_config)).eval()


def test_cached_generation_equals_uncached(model: VisionLanguageModel, eval_images: list[Path]) -> None:
    images = eval_images
    conversations = [[Turn("human", "<image>\nWhat colour is the circle?")],
                     [Turn("human", "Name a colour.")],
                     [Turn("human", "<image> and <image>: how many objects?")]]
    picks = [images[:1], [], images[1:3]]
    reqs = [Request(c, p, SamplingParams(max_new_tokens=8)) for c, p in zip(conversations, picks, strict=True)]
    cached = [c.token_ids for c in Engine(model).generate(reqs)]
    samples = [Sample(f"s{i}", c, [Path(x) for x in p]) for i, (c, p) in enumerate(zip(conversations, picks,
                                                                                       strict=True))]
    batch = model.processor(samples, for_generation=True)
    uncached = model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, max_new_tokens=8,
                              use_cache=False)
    assert cached == uncached
    assert all(len(row) == 8 for row in cached)
    assert len({tuple(r) for r in cached}) == 3
    # Each row alone, with the cache, answers as in the batch: bridge inputs follow their row.
    assert [Engine(model).generate([r])[0].token_ids for r in reqs] == cached


def test_images_reach_the_lm_through_every_bridge(model: VisionLanguageModel) -> None:
    from PIL import Image

    turn = [Turn("human", "<image>\nWhat colour is the circle?")]
    red = Image.new("RGB", (64, 64), (220, 20, 20))
    noise = Image.effect_noise((64, 64), 80).convert("RGB")
    a, b = Engine(model).generate([Request(turn, [red]), Request(turn, [noise])])
    assert a.token_ids != b.token_ids


@pytest.mark.parametrize("bridge", ["mlp", "gated_xattn", "visual_expert"])
def test_lora_wrapped_lm_generates_with_the_cache_as_without(bridge: str, tiny_model_config: ModelConfig,
                                                           eval_images: list[Path]) -> None:
    from chiasm.config import PolicyConfig
    from chiasm.train.policy import apply_policy

    tiny_model_config.bridge = BridgeConfig(name=bridge)
    torch.manual_seed(0)
    model = spread_weights(VisionLanguageModel.build(tiny_model_config))
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=4))
    randomise_lora(model.lm, std=0.5)
    model.train()
    turns = [Turn("human", "<image>\nWhat colour is the circle?")]
    cached = Engine(model).generate([Request(turns, eval_images[:1], SamplingParams(max_new_tokens=6))])[0]
    assert model.training  # the engine answered in eval mode and gave the caller's mode back
    model.eval()
    batch = model.processor([Sample("s", turns, eval_images[:1])], for_generation=True)
    uncached = model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, max_new_tokens=6,
                              use_cache=False)
    assert [cached.token_ids] == uncached and len(cached.token_ids) == 6
    with torch.no_grad(), model.lm.disable_adapter():  # the adapters take part in the answer
        plain = model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, max_new_tokens=6)
    assert plain != uncached
