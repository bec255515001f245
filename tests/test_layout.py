"""Image layouts: quadrant names in words before each quadrant's visual tokens."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chiasm.config import BridgeConfig, ConfigError, ModelConfig, from_dict
from chiasm.data.llava import load_llava
from chiasm.layout import check_layout, image_text, token_order
from chiasm.model import VisionLanguageModel
from chiasm.synthetic.layout import QUADRANTS
from chiasm.synthetic.world import WorldFiles
from chiasm.tokens import IMAGE_TOKEN
from chiasm.train.batches import collate, conversation_encoder, prepare


def test_quadrant_order_of_a_4x4_grid() -> None:
    # Row-major indices of a 4 x 4 grid, regrouped: each quadrant's 2 x 2 block, quadrants in reading order.
    assert token_order("quadrants", (4, 4), 16) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert token_order("quadrants", (2, 4), 8) == [0, 1, 2, 3, 4, 5, 6, 7]  # one row of two per quadrant
    assert token_order("quadrants", (2, 2), 4) == [0, 1, 2, 3]
    assert token_order("raster", (4, 4), 16) is None
    assert sorted(token_order("quadrants", (6, 8), 48)) == list(range(48))


def test_image_text_names_each_quadrant_before_and_after_its_tokens() -> None:
    text = image_text("quadrants", 16)
    assert text.count(IMAGE_TOKEN) == 16
    lines = text.split("\n")
    assert lines == [f"{name}: {IMAGE_TOKEN * 4} in the {name}" for name in QUADRANTS]
    assert image_text("raster", 5) == IMAGE_TOKEN * 5


@pytest.mark.parametrize(("layout", "grid", "n", "message"), [
    ("quadrants", None, 32, "tokens form a grid"),
    ("quadrants", (3, 3), 9, "even token grid"),
    ("quadrants", (4, 4), 12, "even token grid"),
    ("spiral", (4, 4), 16, "unknown image layout"),
])
def test_layouts_the_tokens_cannot_follow_are_refused(layout: str, grid: tuple[int, int] | None, n: int,
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_layout(layout, grid, n)


def test_config_accepts_only_known_layouts() -> None:
    assert from_dict(ModelConfig, {"image_layout": "quadrants"}).image_layout == "quadrants"
    assert from_dict(ModelConfig, {}).image_layout == "raster"
    with pytest.raises(ConfigError, match="image_layout"):
        from_dict(ModelConfig, {"image_layout": "spiral"})


def test_a_learned_query_bridge_refuses_quadrants_when_built(tiny_model_config: ModelConfig) -> None:
    cfg = replace(tiny_model_config, image_layout="quadrants",
                  bridge=BridgeConfig(name="perceiver", options={"num_queries": 8}))
    with pytest.raises(ValueError, match="tokens form a grid"):
        VisionLanguageModel.build(cfg)


@pytest.fixture
def quadrant_model(tiny_model_config: ModelConfig) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel.build(replace(tiny_model_config, image_layout="quadrants"))


def test_prompt_holds_the_names_and_the_same_token_count(quadrant_model: VisionLanguageModel,
                                                         tiny_world: WorldFiles) -> None:
    sample = load_llava(tiny_world.instruct).samples[0]
    ids = conversation_encoder(quadrant_model).encode(sample).input_ids
    image_id = quadrant_model.image_token_id
    assert ids.count(image_id) == 16
    text = quadrant_model.tokenizer.decode([i for i in ids if i != image_id])
    positions = [text.index(name + ":") for name in QUADRANTS]
    assert positions == sorted(positions)
    # Each quadrant's 4 tokens form one run right after its name.
    runs, run = [], 0
    for i in ids:
        if i == image_id:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert runs == [4, 4, 4, 4]


def test_each_quadrant_name_is_followed_by_that_quadrants_tokens(quadrant_model: VisionLanguageModel,
                                                                 tiny_world: WorldFiles) -> None:
    model = quadrant_model.eval()
    prepared, _ = prepare(load_llava(tiny_world.instruct).samples[:2], model)
    batch = collate(prepared, model.tokenizer.pad_token_id, model=model)
    with torch.no_grad():
        features = model.encode_images(batch.pixels)
        embeds = model.embed(batch.input_ids, features)
        vis = model.visual_tokens(features)  # (2, 16, D), row-major over the 4 x 4 grid
    is_image = batch.input_ids == model.image_token_id
    placed = embeds[is_image].view(2, 4, 4, -1)  # image, quadrant, token in quadrant
    grid = vis.view(2, 2, 2, 2, 2, -1)  # image, quadrant row, row in quadrant, quadrant col, col in quadrant
    for q, (qr, qc) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = grid[:, qr, :, qc, :].reshape(2, 4, -1)
        assert torch.equal(placed[:, q], expected), QUADRANTS[q]


def test_layout_survives_save_and_load(quadrant_model: VisionLanguageModel, tmp_path: Path) -> None:
    loaded = VisionLanguageModel.load(quadrant_model.save(tmp_path / "m"))
    assert loaded.config.image_layout == "quadrants"
    assert loaded.token_order == quadrant_model.token_order
