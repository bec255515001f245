"""chiasm.explain on tiny models: grid, visual tokens read as words, attention of the answer, heat maps."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from chiasm import explain as explain_module
from chiasm.config import BridgeConfig, ModelConfig
from chiasm.encoders.preprocessing import ImagePreprocessing
from chiasm.explain import eager_attention, explain, nearest_words, word_rows
from chiasm.explain_geometry import cell_boxes, geometry, resample_grid
from chiasm.model import VisionLanguageModel


def build(config: ModelConfig, bridge: str, **options) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel.build(replace(config, bridge=BridgeConfig(name=bridge, options=options)))


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))


def test_shapes_and_json(tiny_model: VisionLanguageModel, picture: Image.Image) -> None:
    out = explain(tiny_model, picture, "what colour is the circle?", top_words=3, max_new_tokens=4)
    json.dumps(out)  # what the server sends as it is
    assert out["image"] == {"width": 80, "height": 48}
    assert out["encoder"]["grid"] == [4, 4] and out["encoder"]["grid_kind"] == "patch grid"
    assert len(out["encoder"]["cells"]) == 16
    assert out["bridge"]["spatial"] and out["bridge"]["token_grid"] == [4, 4]
    assert [t["index"] for t in out["tokens"]] == list(range(16))
    assert all(len(t["nearest"]) == 3 and "box" in t for t in out["tokens"])
    n_answer = len(out["answer"]["token_ids"])
    assert out["answer"]["generated"] and 1 <= n_answer <= 4
    att = out["attention"]
    assert len(att["per_token"]) == n_answer and len(att["token_attention"]) == 16
    assert np.array(att["heat_map"]).shape == (4, 4)
    assert att["layers"] == [1] and att["heads"] == 4  # the upper half of the tiny LM's 2 layers


def test_nearest_words_equal_brute_force(tiny_model: VisionLanguageModel, picture: Image.Image,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(explain_module, "_CHUNK", 37)  # several chunks, merged
    out = explain(tiny_model, picture, "where is the square?", answer="top left", top_words=5)
    with torch.no_grad():
        pixels = tiny_model.processor.preprocess(picture)[None]
        visual = tiny_model.visual_tokens(tiny_model.encode_images(pixels))[0].double()
    table = tiny_model.lm.get_input_embeddings().weight.detach().double()
    allowed = word_rows(tiny_model)
    cos = (visual / visual.norm(dim=-1, keepdim=True)) @ (table / table.norm(dim=-1, keepdim=True)).T
    cos[:, ~allowed] = -2
    for token in out["tokens"]:
        ref = torch.argsort(cos[token["index"]], descending=True)[:5].tolist()
        assert [w["id"] for w in token["nearest"]] == ref
        assert [w["cosine"] for w in token["nearest"]] == pytest.approx(cos[token["index"], ref].tolist(), abs=1e-4)
    specials = set(tiny_model.tokenizer.all_special_ids)
    assert not specials & {w["id"] for t in out["tokens"] for w in t["nearest"]}


def test_nearest_words_respects_allowed_rows() -> None:
    table = torch.eye(4)
    ids, cos = nearest_words(torch.tensor([[1.0, 0.1, 0.05, 0]]), table, 2, torch.tensor([False, True, True, True]))
    assert ids.tolist() == [[1, 2]] and cos[0, 0] == pytest.approx(0.1 / np.sqrt(1.0125))


def test_visual_token_equal_to_a_word_is_read_as_that_word(tiny_model_config: ModelConfig,
                                                           picture: Image.Image) -> None:
    model = build(tiny_model_config, "linear")
    word = model.tokenizer(" circle", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        model.bridge.proj.weight.zero_()
        model.bridge.proj.bias.copy_(model.lm.get_input_embeddings().weight[word])
    out = explain(model, picture, "what shape?", answer="circle", top_words=2)
    for token in out["tokens"]:
        assert token["nearest"][0]["id"] == word and token["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert token["nearest"][0]["text"] == model.tokenizer.decode([word])


def test_attention_rows_and_heat_map_add_up(tiny_model: VisionLanguageModel, picture: Image.Image) -> None:
    out = explain(tiny_model, picture, "how many objects?", answer="two red circles", last_layers=2)
    att = out["attention"]
    assert att["layers"] == [0, 1]
    assert att["row_sums"] == pytest.approx([1.0] * len(att["per_token"]), abs=1e-5)
    for entry in att["per_token"]:
        assert 0 < entry["image_share"] < 1
        assert np.sum(entry["heat"]) == pytest.approx(entry["image_share"])
        assert np.sum(entry["token_attention"]) == pytest.approx(entry["image_share"])
    assert np.mean([e["image_share"] for e in att["per_token"]]) == pytest.approx(att["image_share"])
    assert np.sum(att["token_attention"]) == pytest.approx(att["image_share"])
    assert att["token_attention"] == pytest.approx(np.mean([e["token_attention"] for e in att["per_token"]], axis=0))
    assert np.array(att["heat_map"]) == pytest.approx(np.mean([e["heat"] for e in att["per_token"]], axis=0))
    assert out["answer"]["token_ids"] == tiny_model.tokenizer("two red circles", add_special_tokens=False).input_ids


def test_attention_matches_a_manual_reference(tiny_model: VisionLanguageModel, picture: Image.Image) -> None:
    """The share read off the last layer equals the softmax rows recomputed from that layer's own q and k."""
    out = explain(tiny_model, picture, "what colour?", answer="red", last_layers=1)
    captured = {}
    layer = tiny_model.lm.model.layers[-1].self_attn
    hook = layer.register_forward_hook(lambda m, a, k, o: captured.update(weights=o[1]), with_kwargs=True)
    try:
        prompt = explain_module._prompt_ids(tiny_model, "<image>\nwhat colour?")
        answer = tiny_model.tokenizer("red", add_special_tokens=False).input_ids
        seq = torch.tensor([prompt + answer])
        with torch.no_grad():
            pixels = tiny_model.processor.preprocess(picture)[None]
            embeds, _ = tiny_model.lm_inputs(seq, tiny_model.encode_images(pixels))
            with eager_attention(tiny_model.base_lm):
                tiny_model.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(seq))
    finally:
        hook.remove()
    rows = captured["weights"][0].double().mean(0)[len(prompt) - 1:len(prompt) - 1 + len(answer)]
    image = seq[0] == tiny_model.image_token_id
    assert [e["image_share"] for e in out["attention"]["per_token"]] == pytest.approx(rows[:, image].sum(-1).tolist())


@pytest.mark.parametrize(("bridge", "options", "token_grid"), [
    ("pixel_shuffle", {}, [2, 2]), ("mlp", {"upsample": 2}, [8, 8]), ("c_abstractor", {"num_queries": 4}, [2, 2]),
    ("visual_expert", {}, [4, 4])])
def test_heat_map_has_the_encoder_grid_size(tiny_model_config: ModelConfig, picture: Image.Image, bridge: str,
                                            options: dict, token_grid: list[int]) -> None:
    out = explain(build(tiny_model_config, bridge, **options), picture, "what is it?", answer="a circle")
    assert out["bridge"]["token_grid"] == token_grid
    assert np.array(out["attention"]["heat_map"]).shape == (4, 4)
    assert np.sum(out["attention"]["heat_map"]) == pytest.approx(out["attention"]["image_share"])
    assert len(out["tokens"]) == token_grid[0] * token_grid[1]


def test_learned_query_bridge_has_no_spatial_layout(tiny_model_config: ModelConfig, picture: Image.Image) -> None:
    out = explain(build(tiny_model_config, "qformer", num_queries=4), picture, "what is it?", answer="a circle")
    assert not out["bridge"]["spatial"] and out["bridge"]["note"].startswith("no spatial layout")
    assert len(out["tokens"]) == 4 and all("box" not in t for t in out["tokens"])
    att = out["attention"]
    assert att["heat_map"] is None and "no spatial layout" in att["note"]
    assert len(att["token_attention"]) == 4 and att["image_share"] > 0


def test_gated_cross_attention_says_what_is_missing(tiny_model_config: ModelConfig, picture: Image.Image) -> None:
    out = explain(build(tiny_model_config, "gated_xattn", every=1, heads=4), picture, "what is it?", answer="a dot")
    assert out["bridge"]["in_lm"] and out["bridge"]["tokens_per_image"] == 1
    assert len(out["encoder"]["cells"]) == 16  # the grid is still the encoder's
    att = out["attention"]
    assert att["heat_map"] is None and "cross-attention" in att["note"] and "no heat map" in att["note"]


def test_bad_input_is_refused(tiny_model: VisionLanguageModel, picture: Image.Image) -> None:
    with pytest.raises(ValueError, match="the question is empty"):
        explain(tiny_model, picture, "  ")
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        explain(tiny_model, picture, "<image> <image> compare")
    with pytest.raises(ValueError, match="top_words must be at least 1, got 0"):
        explain(tiny_model, picture, "what?", top_words=0)
    with pytest.raises(ValueError, match="last_layers must be between 1 and the LM's 2 layers, got 3"):
        explain(tiny_model, picture, "what?", answer="x", last_layers=3)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        explain(tiny_model, picture, "what?", max_new_tokens=0)
    with pytest.raises(TypeError, match="needs a PIL image, got str"):
        explain(tiny_model, "photo.png", "what?")  # type: ignore[arg-type]


def test_empty_answer_explains_the_end_of_the_turn(tiny_model: VisionLanguageModel, picture: Image.Image) -> None:
    out = explain(tiny_model, picture, "what?", answer="")
    assert out["answer"]["token_ids"] == [] and not out["answer"]["generated"]
    assert len(out["attention"]["per_token"]) == 1 and out["attention"]["row_sums"] == [pytest.approx(1.0)]


def test_module_modes_are_restored(tiny_model: VisionLanguageModel, picture: Image.Image) -> None:
    tiny_model.train()
    tiny_model.encoder.eval()  # as a trainer leaves a frozen encoder
    explain(tiny_model, picture, "what?", answer="red")
    assert tiny_model.training and tiny_model.lm.training and not tiny_model.encoder.training


def test_eager_attention_is_restored(tiny_model: VisionLanguageModel) -> None:
    before = tiny_model.base_lm.config._attn_implementation
    with eager_attention(tiny_model.base_lm):
        assert tiny_model.base_lm.config._attn_implementation == "eager"
    assert tiny_model.base_lm.config._attn_implementation == before


@pytest.mark.parametrize("pre", [
    ImagePreprocessing(size=(64, 64), pad_to_square=True, resample="nearest"),
    ImagePreprocessing(size=(64,), resize="shortest_edge", crop=(64, 64), resample="nearest"),
    ImagePreprocessing(size=(64, 64), resample="nearest")])
def test_cell_boxes_invert_the_preprocessing(pre: ImagePreprocessing) -> None:
    """A cell's box, painted on the original image, is what the encoder sees in that cell."""
    width, height, grid = 160, 96, (4, 4)
    geo = geometry(pre, width, height)
    assert geo.input_size == (64, 64)
    cells = cell_boxes(geo, grid)
    for cell in cells:
        if cell["visible"] < 1:
            continue
        image = Image.new("RGB", (width, height), (0, 0, 0))
        x0, y0, x1, y1 = cell["box"]
        image.paste((255, 255, 255), (round(x0), round(y0), round(x1), round(y1)))
        pixels = pre(image)[0]  # one channel, normalised
        lit = pixels > 0.5  # white is 1 after the (0.5, 0.5) normalisation; black -1, padding 0
        r, c = cell["row"], cell["col"]
        inside = lit[r * 16 + 2:(r + 1) * 16 - 2, c * 16 + 2:(c + 1) * 16 - 2]
        assert bool(inside.all()), cell
        outside = lit.clone()
        outside[max(r * 16 - 2, 0):(r + 1) * 16 + 2, max(c * 16 - 2, 0):(c + 1) * 16 + 2] = False
        assert not bool(outside.any()), cell
    if pre.pad_to_square:  # 160 x 96 padded to 160 x 160: the top row shows 8 of its 40 rows
        assert [c["visible"] for c in cells[:4]] == [pytest.approx(0.2)] * 4
        assert cells[0]["box"] == [0.0, 0.0, 40.0, 8.0]


def test_resample_grid_keeps_the_mass() -> None:
    coarse = np.array([[1.0, 2.0], [3.0, 4.0]])
    fine = resample_grid(coarse, (4, 4))
    assert fine.shape == (4, 4) and fine.sum() == pytest.approx(10.0)
    assert fine[:2, :2] == pytest.approx(np.full((2, 2), 0.25))
    assert resample_grid(fine, (2, 2)) == pytest.approx(coarse)
    odd = resample_grid(coarse, (3, 3))
    assert odd.sum() == pytest.approx(10.0) and odd[0, 0] == pytest.approx(1.0 * (2 / 3) ** 2)
