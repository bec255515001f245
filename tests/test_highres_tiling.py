"""Dynamic high resolution: grids against LLaVA-NeXT's and InternVL's choices, views, and the one count."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from chiasm.config import ModelConfig
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.highres.tiling import TilingConfig, TilingError, choose_grid, image_text, n_views, views
from chiasm.model import VisionLanguageModel
from chiasm.tokens import IMAGE_TOKEN, image_token_count


def _internvl_closest(aspect_ratio: float, target_ratios: list, width: int, height: int, image_size: int):
    """InternVL's find_closest_aspect_ratio as published (ratios are (cols, rows)): the reference."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def test_aspect_grid_matches_internvl() -> None:
    cfg = TilingConfig(mode="aspect", max_tiles=6, max_distortion=100)
    rng = random.Random(0)
    ratios = sorted({(i, j) for n in range(1, 7) for i in range(1, n + 1) for j in range(1, n + 1) if 1 <= i * j <= 6},
                    key=lambda x: x[0] * x[1])
    for _ in range(300):
        w, h = rng.randint(8, 3000), rng.randint(8, 3000)
        cols, rows = _internvl_closest(w / h, ratios, w, h, 448)
        assert choose_grid((w, h), cfg, 448) == (rows, cols), (w, h)


def test_anyres_grid_matches_llava_next() -> None:
    pins = [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]]
    cfg = TilingConfig(mode="anyres", max_tiles=4, pinpoints=pins, max_distortion=100)
    allowed = [(r * 336, c * 336) for r, c in pins if r * c <= 4]  # (height, width) as transformers takes them
    rng = random.Random(1)
    for _ in range(300):
        w, h = rng.randint(8, 2500), rng.randint(8, 2500)
        bh, bw = select_best_resolution((h, w), allowed)
        assert choose_grid((w, h), cfg, 336) == (bh // 336, bw // 336), (w, h)


def test_views_are_the_thumbnail_then_the_tiles_row_by_row() -> None:
    cfg = TilingConfig(mode="aspect", max_tiles=4)
    img = Image.effect_noise((256, 128), 60).convert("RGB")  # 2:1 -> one row of two tiles
    got = views(img, cfg, 64)
    assert choose_grid(img.size, cfg, 64) == (1, 2) and len(got) == 3 == n_views(img.size, cfg, 64)
    canvas = img.resize((128, 64), Image.Resampling.BICUBIC)
    assert got[0].tobytes() == img.resize((64, 64), Image.Resampling.BICUBIC).tobytes()
    assert got[2].tobytes() == canvas.crop((64, 0, 128, 64)).tobytes()
    # A square image takes the 1 x 1 grid: the global view alone.
    assert n_views((60, 60), cfg, 64) == 1 and len(views(Image.new("RGB", (60, 60)), cfg, 64)) == 1
    assert n_views((300, 300), cfg, 64) == 5  # InternVL: a large square takes the larger square grid
    text = image_text(img.size, cfg, 64, "<v>")
    assert text == "<global-img><v>\n<row_1_col_1><v><row_1_col_2><v>\n"
    assert image_text(img.size, replace(cfg, separators="none"), 64, "<v>") == "<v>" * 3


def test_images_no_grid_takes_are_refused() -> None:
    cfg = TilingConfig(max_tiles=4)
    with pytest.raises(TilingError, match="too small"):
        choose_grid((4, 100), cfg, 64)
    with pytest.raises(TilingError, match="too large"):
        choose_grid((10_000, 10_000), replace(cfg, max_image_pixels=1_000_000), 64)
    with pytest.raises(TilingError, match="too elongated"):
        choose_grid((5000, 20), cfg, 64)


def _tiled(config: ModelConfig) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel.build(replace(config, tiling=TilingConfig(max_tiles=4)))


def _image(tmp_path: Path, name: str, size: tuple[int, int]) -> Path:
    path = tmp_path / name
    Image.effect_noise(size, 50).convert("RGB").save(path)
    return path


def test_tiled_training_and_generation_agree_on_the_count(tiny_model_config: ModelConfig, tmp_path: Path) -> None:
    from chiasm.generation.engine import Engine
    from chiasm.generation.requests import Request, SamplingParams

    model = _tiled(tiny_model_config)
    wide, square = _image(tmp_path, "wide.png", (256, 128)), _image(tmp_path, "sq.png", (64, 64))
    sample = Sample("s1", [Turn("human", "<image> left, <image> right. Same?"), Turn("gpt", "no")],
                    [wide, square], source="d.json")
    proc = model.processor
    prepared, _ = proc.prepare([sample])
    batch = proc.collate(prepared)
    per_image = [image_token_count(model.encoder, model.bridge, Image.open(p).size, model.config.tiling)
                 for p in (wide, square)]
    assert per_image == [3 * 16, 16]
    assert int((batch.input_ids == model.image_token_id).sum()) == sum(per_image)
    assert batch.pixels.shape == (4, 3, 64, 64)  # all views of the batch encoded as one batch
    out = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels)
    out.loss.backward()
    grads = [p.grad for p in model.bridge.parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and any(g.abs().sum() > 0 for g in grads)
    text = model.tokenizer.decode(prepared[0].encoded.input_ids)
    assert "<row_1_col_2>" in text and text.count(IMAGE_TOKEN) == sum(per_image)
    engine = Engine(model)
    done = engine.generate([Request([Turn("human", "<image> what?")], [Image.open(wide)],
                                    SamplingParams(max_new_tokens=3))])
    assert done[0].prompt_tokens == len(proc.conversation.encode_prompt(
        Sample("q", [Turn("human", "<image> what?")], [wide])).input_ids)
    saved = VisionLanguageModel.load(model.save(tmp_path / "m"))
    assert saved.processor.tiling == model.config.tiling


def test_bad_tiled_samples_name_file_and_sample_or_are_skipped(tiny_model_config: ModelConfig,
                                                              tmp_path: Path) -> None:
    model = _tiled(tiny_model_config)
    tiny, ok = _image(tmp_path, "tiny.png", (4, 40)), _image(tmp_path, "ok.png", (128, 64))
    bad = Sample("b1", [Turn("human", "<image> what?"), Turn("gpt", "x")], [tiny], source="data.json")
    extra = Sample("b2", [Turn("human", "<image> what?"), Turn("gpt", "x")], [ok, ok], source="data.json")
    good = Sample("g", [Turn("human", "<image> what?"), Turn("gpt", "x")], [ok], source="data.json")
    with pytest.raises(DataError, match=r"\[file data.json, sample 'b1'\] .*tiny.png: image of 4 x 40 .*too small"):
        model.processor.prepare([bad])
    with pytest.raises(DataError, match=r"sample 'b2'.*1 <image> placeholder\(s\) but 2 image"):
        model.processor.prepare([extra])
    prepared, skipped = model.processor.prepare([bad, extra, good], on_error="skip")
    assert [p.sample.id for p in prepared] == ["g"] and [s[0] for s in skipped] == ["b1", "b2"]


@pytest.mark.parametrize("on_disk", [False, True])
def test_the_feature_cache_holds_every_view_of_a_tiled_image(tiny_model_config: ModelConfig, tmp_path: Path,
                                                             on_disk: bool) -> None:
    """Cached rows of each image's views equal the encoder on the processor's pixels, in sequence order."""
    from chiasm.features import FeatureCache

    model = _tiled(tiny_model_config)
    proc = model.processor
    paths = [str(_image(tmp_path, f"{k}.png", size)) for k, size in
             enumerate([(256, 128), (64, 64), (128, 128), (128, 256)])]
    cache = FeatureCache.build(model.encoder, paths, cache_dir=tmp_path / "cache" if on_disk else None, world=2,
                               show_progress=False, batch_size=3, preprocess=proc.image_views,
                               views=(proc.view_count, proc.views_key()))
    with torch.no_grad():
        want = model.encoder(proc.pixels([Image.open(p) for p in paths[::-1]]))
    got = cache.lookup(paths[::-1])
    assert [proc.view_count(p) for p in paths] == [3, 1, 5, 3]
    assert got.shape == want.shape == (12, 16, model.encoder.dim)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)  # fp16 rows
    with pytest.raises(DataError, match=r"cache\.png: cannot read the image's size"):
        (tmp_path / "cache.png").write_bytes(b"not an image")
        FeatureCache.build(model.encoder, [str(tmp_path / "cache.png")], show_progress=False,
                           preprocess=proc.image_views, views=(proc.view_count, proc.views_key()))
    assert '"max_tiles": 4' in proc.views_key()  # the tiling enters the cache's fingerprint


def test_tiled_training_reads_the_cache_and_matches_encoding_every_step(tiny_model_config: ModelConfig,
                                                                        tmp_path: Path) -> None:
    from chiasm.config import PolicyConfig, RunConfig, StageConfig
    from chiasm.synthetic.seeing import make_seeing_world
    from chiasm.train.trainer import Trainer

    world = make_seeing_world("small_objects", tmp_path / "w", n_train=8, n_eval=2, image_size=128)["train"]
    config = replace(tiny_model_config, tiling=TilingConfig(max_tiles=4))

    def trained(cache: bool) -> VisionLanguageModel:
        torch.manual_seed(0)
        stage = StageConfig(name="instruct", data=str(world), encoder=PolicyConfig(mode="frozen"), lr=1e-2,
                            batch_size=4, max_steps=2, feature_cache=cache)
        return Trainer(RunConfig(model=config, output_dir=str(tmp_path / f"run-{cache}"), precision="fp32",
                                 stages=[stage]), show_progress=False).run()

    cached, encoded = trained(True), trained(False)
    assert list((tmp_path / "run-True" / "cache").glob("features-*/shard-*.npy"))
    for (name, a), (_, b) in zip(cached.bridge.state_dict().items(), encoded.bridge.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2, msg=name)


def test_explain_refuses_a_tiled_model_with_a_reason(tiny_model_config: ModelConfig) -> None:
    from chiasm.explain import explain

    model = _tiled(tiny_model_config)
    with pytest.raises(ValueError, match="explain shows one view per image; this model tiles its images"):
        explain(model, Image.new("RGB", (128, 64)), "what is this?")
