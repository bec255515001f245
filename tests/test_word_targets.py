"""Word-target pre-alignment: token blocks of an upsampling MLP, named groups, targets, the stage."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from chiasm.bridges.base import build_bridge
from chiasm.config import BridgeConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import load_llava
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.layout import get_layout, token_order
from chiasm.model import VisionLanguageModel
from chiasm.synthetic.word_targets import WordTargetObjective, stretch
from chiasm.train.features import FeatureCache
from chiasm.train.trainer import Trainer

FROZEN = PolicyConfig(mode="frozen")


def test_upsampling_mlp_lays_each_cells_tokens_out_as_a_block() -> None:
    torch.manual_seed(0)
    bridge = build_bridge(BridgeConfig(name="mlp", options={"upsample": 2, "pos_dim": 8}), 6, 5)
    feats = torch.randn(3, 2 * 3, 6)
    out = bridge(feats, (2, 3))
    assert bridge.num_tokens((2, 3)) == 24 and bridge.token_grid((2, 3)) == (4, 6) and out.shape == (3, 24, 5)
    # Reference: the MLP's output for cell (r, c) is 4 tokens (i, j) that land at (2r + i, 2c + j).
    x = torch.cat([bridge.norm(feats), _code(bridge, (2, 3)).expand(3, -1, -1)], -1)
    per_cell = bridge.fc2(bridge.act(bridge.fc1(x))).view(3, 2, 3, 2, 2, 5)
    grid = out.view(3, 4, 6, 5)
    for r in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    torch.testing.assert_close(grid[:, 2 * r + i, 2 * c + j], per_cell[:, r, c, i, j])
    plain = build_bridge(BridgeConfig(name="mlp"), 6, 5)
    assert plain(feats, (2, 3)).shape == (3, 6, 5) and plain.token_grid((2, 3)) == (2, 3)
    with pytest.raises(ValueError, match="upsample must be at least 1"):
        build_bridge(BridgeConfig(name="mlp", options={"upsample": 0}), 6, 5)


def _code(bridge, grid):
    from chiasm.bridges.positions import fractional_sincos_2d

    return fractional_sincos_2d(grid, bridge.pos_dim)


def test_quadrant_groups_follow_the_token_order_and_points_find_their_quadrant() -> None:
    quadrants, raster = get_layout("quadrants"), get_layout("raster")
    groups = quadrants.token_groups((4, 4), 16)
    assert [name for name, _ in groups] == ["top left", "top right", "bottom left", "bottom right"]
    assert groups[1][1] == [2, 3, 6, 7] and groups[2][1] == [8, 9, 12, 13]
    assert token_order("quadrants", (4, 4), 16) == [i for _, m in groups for i in m]
    assert raster.token_groups((4, 4), 16) == [] and token_order("raster", (4, 4), 16) is None
    assert [quadrants.group_at(x, y) for x, y in [(0.1, 0.2), (0.7, 0.2), (0.2, 0.9), (0.5, 0.5)]] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no named groups"):
        raster.group_at(0.1, 0.1)


def test_stretch_holds_each_word_in_order_and_refuses_what_does_not_fit() -> None:
    assert stretch([7, 8, 9], 4) == [7, 7, 8, 9]
    assert stretch([5], 3) == [5, 5, 5] and stretch([1, 2], 2) == [1, 2]
    with pytest.raises(ValueError, match="3 tokens do not fit a group of 2"):
        stretch([1, 2, 3], 2)


@pytest.fixture
def grouped_config(tiny_model_config):
    """The tiny model with 8 x 8 tokens (4 x 4 features, upsample 2) in quadrants: 16 tokens a group."""
    return dataclasses.replace(tiny_model_config, image_layout="quadrants",
                               bridge=BridgeConfig(name="mlp", options={"upsample": 2}))


def _stage(data, **kw) -> StageConfig:
    return StageConfig(name="prealign", data=str(data), encoder=FROZEN, lm=FROZEN, objective="words",
                       batch_size=8, **kw)


def test_targets_put_each_phrase_on_its_quadrant_and_empty_elsewhere(grouped_config, tiny_world) -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(grouped_config)
    samples = load_llava(tiny_world.align).samples
    objective = WordTargetObjective(model, samples, _stage(tiny_world.align, empty_phrase="nothing"))
    words = lambda p: model.tokenizer(" " + p, add_special_tokens=False).input_ids  # noqa: E731
    for s, row in zip(samples[:6], objective.targets.tolist(), strict=False):
        cells = {o["cell"]: f"{o['size']} {o['colour']} {o['shape']}" for o in s.meta["scene"]["objects"]}
        for name, members in objective.groups:
            expected = stretch(words(cells.get(name, "nothing")), len(members))
            assert [row[i] for i in members] == expected, (s.id, name)


def test_words_stage_refuses_crowded_groups_raster_layouts_and_long_phrases(grouped_config, tiny_model_config,
                                                                           tiny_world, tmp_path) -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(grouped_config)
    crowded = Sample("c-1", [Turn("human", "<image>\nDescribe."), Turn("gpt", "Two.")], images=[tmp_path / "x.png"],
                     meta={"regions": [{"phrase": "red circle", "box": [0, 0, 0.2, 0.2]},
                                       {"phrase": "blue square", "box": [0.2, 0.2, 0.4, 0.4]}]}, source="g.json")
    with pytest.raises(DataError, match=r"g\.json.*c-1.*'red circle' and 'blue square' both lie in the top left"):
        WordTargetObjective(model, [crowded], _stage(tiny_world.align))
    skipping = WordTargetObjective(model, [crowded, *load_llava(tiny_world.align).samples[:4]],
                                   _stage(tiny_world.align, on_error="skip"))
    assert len(skipping) == 4 and skipping.skipped[0][0] == "c-1"
    long = dataclasses.replace(crowded, id="l-1", meta={"regions": [{"phrase": "a " * 20, "box": [0, 0, 0.2, 0.2]}]})
    with pytest.raises(DataError, match=r"l-1.*is 20 tokens; the top left group has only 16"):
        WordTargetObjective(model, [long], _stage(tiny_world.align))
    quiet = dataclasses.replace(crowded, id="e-1", meta={"regions": [{"phrase": "red", "box": [0, 0, 0.2, 0.2]}]})
    with pytest.raises(DataError, match=r"e-1.*phrase '(a )+' is 20 tokens; the top right group has only 16"):
        WordTargetObjective(model, [quiet], _stage(tiny_world.align, empty_phrase="a " * 20))
    raster = VisionLanguageModel.build(tiny_model_config)
    with pytest.raises(DataError, match=r"c-1.*2 regions; with the whole image as one group"):
        WordTargetObjective(raster, [crowded], _stage(tiny_world.align))


def test_without_named_groups_the_whole_image_says_its_region_or_caption(tiny_model_config, tmp_path) -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_model_config)  # raster layout: no named groups
    n = model.tokens_per_image
    img = tmp_path / "x.png"
    grounded = Sample("g", [Turn("human", "<image>\nWhat is in the image?"), Turn("gpt", "a blue circle")], [img],
                      meta={"regions": [{"phrase": "blue circle", "box": [0.1, 0.1, 0.4, 0.4]}]})
    captioned = Sample("c", [Turn("human", "<image>\nDescribe."), Turn("gpt", "a red square")], [img])
    objective = WordTargetObjective(model, [grounded, captioned], _stage(tmp_path / "d.json"))
    words = lambda p: model.tokenizer(" " + p, add_special_tokens=False).input_ids  # noqa: E731
    assert objective.groups == [("image", list(range(n)))]
    assert objective.targets.tolist() == [stretch(words("blue circle"), n), stretch(words("a red square"), n)]
    chat = Sample("m", [Turn("human", "<image>\nA?"), Turn("gpt", "a"), Turn("human", "B?"), Turn("gpt", "b")], [img])
    with pytest.raises(DataError, match=r"'m'.*2 answers and no regions.*one non-empty answer"):
        WordTargetObjective(model, [chat], _stage(tmp_path / "d.json"))


def test_words_stage_learns_the_targets_and_logs_its_accuracy(grouped_config, tiny_world, tmp_path) -> None:
    cfg = RunConfig(model=grouped_config, stages=[_stage(tiny_world.align, max_steps=200, lr=1e-2)],
                    output_dir=str(tmp_path / "run"), seed=0, precision="fp32")
    trainer = Trainer(cfg, show_progress=False)
    model = trainer.run()
    recs = [json.loads(x) for x in (tmp_path / "run/stages/prealign/metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 200 and recs[-1]["loss"] < 0.5 * recs[0]["loss"]
    assert recs[-1]["word_acc"] > recs[0]["word_acc"] and recs[-1]["word_acc"] > 0.5
    # The trained bridge's tokens, in sequence order, sit nearest the words of their own quadrant.
    samples = load_llava(tiny_world.align).samples
    objective = WordTargetObjective(model, samples, cfg.stages[0])
    cache = FeatureCache.build(model.encoder, objective.paths, cache_dir=None, show_progress=False)
    with torch.no_grad():
        _, accuracy = objective.loss(list(range(len(objective))), model.bridge, cache)
    assert accuracy > 0.5
    assert (tmp_path / "run/loss.png").is_file()
