"""Tests on the real pretrained parts that PyPI packages carry (SmolLM2-135M, EfficientNet-Lite0)."""

from __future__ import annotations

import random

import pytest
import torch

from chiasm.config import EncoderConfig
from chiasm.encoders import build_encoder
from chiasm.eval.retention import greedy_answers, held_out_text, perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from chiasm.lm import load_language_model

    return load_language_model("packaged:smollm2-135m-instruct")


def test_smollm2_greedy_answers_are_real_language(smollm2) -> None:
    lm, tok = smollm2
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008
    answers = greedy_answers(lm, tok, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answers[0]


def test_smollm2_perplexity_of_english_is_low(smollm2) -> None:
    lm, tok = smollm2
    ppl, n = perplexity(lm, tok, held_out_text(), max_tokens=1024)
    assert n == 4 * 255
    assert 5 < ppl < 60  # a random 49k-vocabulary model would be near 49,152


def test_efficientnet_lite0_features_are_pretrained_and_colour_aware() -> None:
    from chiasm.synthetic.world import COLOURS, Scene, SceneObject, render_scene

    enc = build_encoder(EncoderConfig(name="efficientnet-lite0", image_size=224)).eval()
    x = torch.stack([enc.preprocess(render_scene(Scene([SceneObject("circle", "red", "large", "top left")])))])
    with torch.no_grad():
        feats = enc(x)
    assert feats.shape == (1, 49, 1280) and enc.grid() == (7, 7)
    rand = build_encoder(EncoderConfig(name="efficientnet-lite0", options={"pretrained": False}))
    assert not torch.equal(rand.net._conv_stem.weight, enc.net._conv_stem.weight)

    # A linear probe reads an object's colour from the multi-level features of the real weights.
    multi = build_encoder(EncoderConfig(name="efficientnet-lite0", image_size=128,
                                        options={"extra_blocks": [10]})).eval()
    rng = random.Random(0)
    colours = sorted(COLOURS)
    images, labels = [], []
    for _ in range(120):
        c = rng.choice(colours)
        images.append(multi.preprocess(render_scene(Scene([SceneObject(rng.choice(["circle", "square", "triangle"]),
                                                                       c, "large", "top left")]))))
        labels.append(colours.index(c))
    with torch.no_grad():
        f = multi(torch.stack(images))[:, [0, 1, 4, 5]].mean(1)  # the top-left 2 x 2 block of a 4 x 4 grid
    assert f.shape[1] == 1280 + 112
    f = (f - f.mean(0)) / (f.std(0) + 1e-5)
    y = torch.tensor(labels)
    w = torch.zeros(f.shape[1], len(colours), requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(f[:80] @ w, y[:80]) + 1e-3 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = ((f[80:] @ w).argmax(1) == y[80:]).float().mean().item()
    assert acc >= 0.9


def test_efficientnet_grid_option_pools_the_maps() -> None:
    """``grid = 2`` at 128 px: 4 tokens, each the mean of a 2 x 2 block of the native 4 x 4 grid."""
    from chiasm.synthetic.world import render_scene, sample_scene

    options = {"extra_blocks": [10], "final": False}
    native = build_encoder(EncoderConfig(name="efficientnet-lite0", image_size=128, options=options)).eval()
    coarse = build_encoder(EncoderConfig(name="efficientnet-lite0", image_size=128,
                                         options={**options, "grid": 2})).eval()
    x = torch.stack([native.preprocess(render_scene(sample_scene(random.Random(i)), 128)) for i in range(3)])
    with torch.no_grad():
        fine, pooled = native(x), coarse(x)
    assert coarse.grid() == (2, 2) and pooled.shape == (3, 4, 112) and fine.shape == (3, 16, 112)
    blocks = fine.view(3, 2, 2, 2, 2, 112).permute(0, 1, 3, 2, 4, 5).reshape(3, 4, 4, 112).mean(2)
    torch.testing.assert_close(pooled, blocks, rtol=1e-5, atol=1e-5)
    assert coarse.cache_key != native.cache_key
    with pytest.raises(ValueError, match="grid 5 must be between 1 and 4"):
        build_encoder(EncoderConfig(name="efficientnet-lite0", image_size=128, options={"grid": 5}))


def test_real_vlm_stage_one_leaves_the_lm_untouched(smollm2, tmp_path) -> None:
    """EfficientNet + MLP + SmolLM2: an align step trains the bridge and keeps text perplexity identical."""
    from chiasm.config import BridgeConfig, LMConfig, ModelConfig, PolicyConfig, RunConfig, StageConfig
    from chiasm.model import VisionLanguageModel
    from chiasm.synthetic.world import make_world
    from chiasm.train.trainer import Trainer

    lm, tok = smollm2
    world = make_world(tmp_path / "world", n_train=8, n_eval=1)
    cfg = ModelConfig(encoder=EncoderConfig(name="efficientnet-lite0", image_size=128),
                      bridge=BridgeConfig(name="mlp"), lm=LMConfig("packaged:smollm2-135m-instruct"),
                      system_prompt="You are a helpful assistant.")
    encoder = build_encoder(cfg.encoder)
    from chiasm.bridges import build_bridge

    model = VisionLanguageModel(cfg, encoder, build_bridge(cfg.bridge, encoder.dim, 576), lm, tok)
    text = held_out_text()
    before, _ = perplexity(model.lm, tok, text, max_tokens=512)
    bridge0 = {k: v.clone() for k, v in model.bridge.state_dict().items()}
    frozen = PolicyConfig(mode="frozen")
    run = RunConfig(model=cfg, stages=[StageConfig(name="align", data=str(world.align), encoder=frozen, lm=frozen,
                                                   max_steps=1, batch_size=4)],
                    output_dir=str(tmp_path / "run"), precision="fp32")
    Trainer(run, model=model, show_progress=False).run()
    after, _ = perplexity(model.lm, tok, text, max_tokens=512)
    assert after == before
    assert any(not torch.equal(bridge0[k], v) for k, v in model.bridge.state_dict().items())
    assert model.tokens_per_image == 16


def test_real_words_prealignment_puts_held_out_tokens_on_their_words(smollm2, tmp_path) -> None:
    """The demo's parts (one EfficientNet feature per quadrant, upsampling MLP, SmolLM2's embeddings):
    a short words stage makes the visual tokens of unseen images sit nearest their own words."""
    from chiasm.bridges import build_bridge
    from chiasm.config import PolicyConfig, RunConfig, StageConfig
    from chiasm.data.llava import load_llava
    from chiasm.demo import DemoSize, demo_config
    from chiasm.model import VisionLanguageModel
    from chiasm.synthetic.word_targets import WordTargetObjective
    from chiasm.synthetic.world import make_world, scene_from_meta, scene_regions
    from chiasm.train.features import FeatureCache
    from chiasm.train.trainer import Trainer

    lm, tok = smollm2
    world = make_world(tmp_path / "world", n_train=128, n_eval=12)
    cfg = demo_config(tmp_path / "run", world, DemoSize()).model
    torch.manual_seed(0)
    encoder = build_encoder(cfg.encoder)
    model = VisionLanguageModel(cfg, encoder, build_bridge(cfg.bridge, encoder.dim, 576), lm, tok)
    frozen = PolicyConfig(mode="frozen")
    stage = StageConfig(name="prealign", data=str(world.align), encoder=frozen, lm=frozen, objective="words",
                        max_steps=150, batch_size=32, lr=1e-3)
    Trainer(RunConfig(model=cfg, stages=[stage], output_dir=str(tmp_path / "run"), precision="fp32"),
            model=model, show_progress=False).run()
    held_out = load_llava(world.eval).samples[::5]
    for s in held_out:  # eval records carry the scene; its regions are those the world gives captions
        s.meta["regions"] = scene_regions(scene_from_meta(s.meta["scene"]))
    objective = WordTargetObjective(model, held_out, stage)
    cache = FeatureCache.build(model.encoder, objective.paths, cache_dir=None, show_progress=False)
    with torch.no_grad():
        _, accuracy = objective.loss(list(range(len(objective))), model.bridge, cache)
    assert model.tokens_per_image == 16 and len(objective) == 12
    assert accuracy > 0.9
