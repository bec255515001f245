"""Grounded phrases: validation, box -> token mapping, the phrase-region loss and its stage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from chiasm.bridges.base import build_bridge
from chiasm.config import BridgeConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import load_llava, save_llava
from chiasm.data.regions import box_token_mask, sample_regions
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.synthetic.world import COLOURS
from chiasm.train.contrastive import region_contrastive_loss, token_contrastive_loss
from chiasm.train.trainer import Trainer

FROZEN = PolicyConfig(mode="frozen")


def _sample(regions) -> Sample:
    return Sample("s-1", [Turn("human", "<image>\nDescribe."), Turn("gpt", "A red circle.")],
                  meta={} if regions is None else {"regions": regions}, source="grounded.json")


def test_regions_are_validated_with_the_sample_named() -> None:
    good = sample_regions(_sample([{"phrase": " red circle ", "box": [0, 0.1, 0.5, 0.6]}]))
    assert good[0].phrase == "red circle" and good[0].box == (0.0, 0.1, 0.5, 0.6)
    bad = {
        "none given": None,
        "non-empty list": [],
        "exactly the keys": [{"phrase": "x", "box": [0, 0, 1, 1], "score": 1}],
        "non-empty text": [{"phrase": " ", "box": [0, 0, 1, 1]}],
        "4 numbers": [{"phrase": "x", "box": [0, 0, 1]}],
        "0 <= x0 < x1": [{"phrase": "x", "box": [0.5, 0, 0.5, 1]}],
    }
    for message, regions in bad.items():
        with pytest.raises(DataError, match=rf"grounded\.json.*s-1.*{message}"):
            sample_regions(_sample(regions))


def test_box_token_mask_takes_cells_overlapping_the_box() -> None:
    assert box_token_mask((0.0, 0.0, 0.5, 0.5), (4, 4)).view(4, 4).int().tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # edges that only touch a cell don't take it
    assert box_token_mask((0.3, 0.6, 0.35, 0.9), (2, 4)).view(2, 4).int().tolist() == [[0, 0, 0, 0], [0, 1, 0, 0]]
    assert bool(box_token_mask((0.0, 0.0, 1.0, 1.0), (3, 5)).all())


def test_spatial_bridges_report_their_token_grid() -> None:
    grids = {name: build_bridge(BridgeConfig(name=name, options=opts), 8, 16).token_grid((4, 4))
             for name, opts in [("linear", {}), ("mlp", {}), ("pixel_shuffle", {}), ("pooling", {}),
                                ("c_abstractor", {"num_queries": 4, "depth": 1}), ("resampler", {"num_queries": 4})]}
    assert grids == {"linear": (4, 4), "mlp": (4, 4), "pixel_shuffle": (2, 2), "pooling": (2, 2),
                     "c_abstractor": (2, 2), "resampler": None}


def _reference_region_loss(v, p, image, tokens, phrase, tau):
    """The loss with loops: best token in the region, same-phrase pairs left out of the negatives."""
    r = len(phrase)
    s = torch.full((r, r), float("-inf"))
    for i in range(r):
        for j in range(r):
            same_place = image[i] == image[j] and bool((tokens[i] == tokens[j]).all())
            if i != j and (phrase[i] == phrase[j] or same_place):
                continue
            s[i, j] = max(float(F.cosine_similarity(v[image[i], n], p[phrase[j]], dim=0))
                          for n in range(v.shape[1]) if tokens[i, n])
    target = torch.arange(r)
    return (F.cross_entropy(s / tau, target) + F.cross_entropy(s.T / tau, target)) / 2


def test_region_loss_matches_loop_reference() -> None:
    torch.manual_seed(0)
    v, p = torch.randn(3, 4, 8), torch.randn(3, 8)
    image = torch.tensor([0, 0, 1, 2, 2, 2])
    tokens = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0]],
                          dtype=torch.bool)
    phrase = torch.tensor([0, 1, 2, 0, 1, 2])  # phrases 0, 1, 2 each name two regions; regions 3 and 5 one box
    loss, acc = region_contrastive_loss(v, p, image, tokens, phrase, 0.1)
    assert float(loss) == pytest.approx(float(_reference_region_loss(v, p, image, tokens, phrase, 0.1)), rel=1e-5)
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="at least one token"):
        region_contrastive_loss(v, p, image, torch.zeros_like(tokens), phrase, 0.1)


def test_region_loss_sees_attributes_bound_to_the_wrong_place() -> None:
    """Image-level matching can't tell "red left, blue right" from the swap; the region loss can."""
    torch.manual_seed(1)
    p = torch.randn(4, 16)  # phrases: red circle, blue square, green circle, yellow square
    bound = torch.stack([torch.stack([p[0], p[1]]), torch.stack([p[2], p[3]])])  # (2 images, 2 tokens, D)
    swapped = bound[:, [1, 0]]
    image, phrase = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3])
    tokens = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=torch.bool)  # object k on token k of its image
    words = torch.stack([torch.stack([p[0], p[1]]), torch.stack([p[2], p[3]])])
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert torch.allclose(token_contrastive_loss(bound, words, mask, 0.05)[0],
                          token_contrastive_loss(swapped, words, mask, 0.05)[0])
    right, acc = region_contrastive_loss(bound, p, image, tokens, phrase, 0.05)
    wrong, _ = region_contrastive_loss(swapped, p, image, tokens, phrase, 0.05)
    assert acc == 1.0 and float(right) < 0.01 < 1.0 < float(wrong)


def test_world_regions_box_each_object(tiny_world) -> None:
    samples = load_llava(tiny_world.align).samples
    for s in samples[:8]:
        regions = sample_regions(s)
        objects = s.meta["scene"]["objects"]
        assert [r.phrase for r in regions] == [f"{o['size']} {o['colour']} {o['shape']}" for o in objects]
        image = Image.open(s.images[0]).convert("RGB")
        for r, o in zip(regions, objects, strict=True):
            x0, y0, x1, y1 = r.box
            centre = (int((x0 + x1) / 2 * image.width), int((y0 + y1) / 2 * image.height))
            assert image.getpixel(centre) == COLOURS[o["colour"]]


def _config(model_cfg, data, out, **kw) -> RunConfig:
    stage = StageConfig(name="prealign", data=str(data), encoder=FROZEN, lm=FROZEN, objective="contrastive",
                        batch_size=8, max_steps=12, lr=1e-2, temperature=0.1, region_weight=1.0, **kw)
    return RunConfig(model=model_cfg, stages=[stage], output_dir=str(out), seed=1, precision="fp32")


def test_region_stage_trains_and_lowers_the_loss(tiny_model_config, tiny_world, tmp_path) -> None:
    trainer = Trainer(_config(tiny_model_config, tiny_world.align, tmp_path / "run"), show_progress=False)
    assert trainer.run() is trainer.model
    recs = [json.loads(x) for x in (tmp_path / "run/stages/prealign/metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert len(recs) == 12 and last < first


def test_region_stage_names_ungrounded_samples_and_refuses_query_bridges(tiny_model_config, tiny_world,
                                                                         tmp_path, caplog) -> None:
    samples = load_llava(tiny_world.align).samples[:9]
    samples[3].meta.pop("regions")
    data = tmp_path / "mixed.json"
    save_llava(samples, data, tmp_path)  # the images stay in the world's folder, outside tmp_path
    with pytest.raises(DataError, match=r"align-00003.*regions: none given"):
        Trainer(_config(tiny_model_config, data, tmp_path / "a", allow_outside_image_root=True),
                show_progress=False).run()
    with caplog.at_level("WARNING"):
        Trainer(_config(tiny_model_config, data, tmp_path / "b", on_error="skip", max_skip_fraction=0.2,
                        allow_outside_image_root=True), show_progress=False).run()
    assert "skipped 1 of 9 samples" in caplog.text
    tiny_model_config.bridge = BridgeConfig(name="resampler", options={"num_queries": 4})
    with pytest.raises(ValueError, match="tokens lie on a grid"):
        Trainer(_config(tiny_model_config, tiny_world.align, tmp_path / "c"), show_progress=False).run()


def test_two_phrases_of_one_box_are_not_each_others_negatives() -> None:
    """"small red circle" and "top left" on one box: one token carrying both satisfies both."""
    p = torch.eye(4)  # two images, each one box named by two phrases
    v = torch.stack([p[0] + p[1], p[2] + p[3]])[:, None]  # (2 images, 1 token, D)
    image, phrase = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3])
    tokens = torch.ones(4, 1, dtype=torch.bool)
    loss, acc = region_contrastive_loss(v, p, image, tokens, phrase, 0.05)
    assert acc == 1.0 and float(loss) < 0.01  # without the rule each row would cost at least log 2
