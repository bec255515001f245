"""The CLIP model: open_clip export equality, save/load, temperature, locked towers, pretrained towers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from clip_cases import tiny_config
from openclip_ref import load
from safetensors.torch import load_file

from chiasm.clip.config import ClipModelConfig, EncoderConfig, ImageTowerConfig, TextTowerConfig
from chiasm.clip.export_openclip import NotExportable, export_open_clip
from chiasm.clip.model import ClipModel
from chiasm.clip.tokenizer import CaptionTokenizer
from chiasm.clip.train import ClipTrainer
from chiasm.errors import ModelFolderError

CAPTIONS = ["a photo of a seven.", "the digit three", "a small red circle in the top left", "one zero."]


def _model(loss: str = "clip", **image) -> ClipModel:
    torch.manual_seed(0)
    tok = CaptionTokenizer.train(CAPTIONS * 3, 100, 12)
    cfg = ClipModelConfig(image=ImageTowerConfig(image_size=16, patch_size=4, width=32, layers=2, head_width=16,
                                                 **image),
                          text=TextTowerConfig(width=32, layers=2, heads=2, context_length=12), embed_dim=24, loss=loss)
    return ClipModel(cfg, tok).eval()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_export_to_open_clip_gives_the_same_embeddings(tmp_path: Path, loss: str) -> None:
    model = _model(loss)
    out = export_open_clip(model, tmp_path / "oc")
    meta = json.loads((out / "open_clip_config.json").read_text())
    oc_model = load("model").CLIP(**meta["model_cfg"])
    missing, unexpected = oc_model.load_state_dict(load_file(str(out / "open_clip_model.safetensors")), strict=False)
    assert not unexpected and all(k == "attn_mask" for k in missing), (missing, unexpected)
    oc_model.eval()
    pixels = torch.randn(3, 3, 16, 16)
    enc = model.tokenizer.encode(CAPTIONS, pad_to_context=True)
    with torch.no_grad():
        assert torch.allclose(oc_model.encode_image(pixels, normalize=True), model.encode_image(pixels), atol=1e-5)
        assert torch.allclose(oc_model.encode_text(enc.ids, normalize=True), model.encode_text(enc.ids, enc.mask),
                              atol=1e-5)
        assert torch.allclose(oc_model.logit_scale.exp(), model.scale())
    # The tokenizer open_clip reads from the folder (transformers' AutoTokenizer) gives the same ids.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    ids = hf(CAPTIONS, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, enc.ids)
    assert meta["preprocess_cfg"]["size"] == 16


def test_export_refuses_pretrained_trunks_and_full_folders(tmp_path: Path) -> None:
    model = _model(kind="encoder", encoder=EncoderConfig(name="tiny-vit", image_size=32, options={"patch": 8}))
    with pytest.raises(NotExportable, match="stays in chiasm's format"):
        export_open_clip(model, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        export_open_clip(_model(), tmp_path / "b")


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _model("siglip")
    model.save(tmp_path / "m")
    back = ClipModel.load(tmp_path / "m")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(back.encode_captions(CAPTIONS), model.encode_captions(CAPTIONS))
    assert float(back.logit_bias) == pytest.approx(-10.0)
    assert back.preprocessing == model.preprocessing


def test_load_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a chiasm CLIP model folder"):
        ClipModel.load(tmp_path)
    _model().save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelFolderError, match=r"model\.safetensors"):
        ClipModel.load(tmp_path / "m")


def test_temperature_starts_as_in_the_papers_and_is_clamped() -> None:
    assert float(_model().scale()) == pytest.approx(1 / 0.07)
    siglip = _model("siglip")
    assert float(siglip.scale()) == pytest.approx(10.0) and float(siglip.logit_bias) == -10.0
    model = _model()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert float(model.scale()) == pytest.approx(100.0)


def test_padding_to_the_batch_or_the_context_gives_the_same_embeddings() -> None:
    model = _model()
    short, full = model.tokenizer.encode(CAPTIONS), model.tokenizer.encode(CAPTIONS, pad_to_context=True)
    assert short.ids.shape[1] < full.ids.shape[1] == 12
    with torch.no_grad():
        assert torch.allclose(model.encode_text(short.ids, short.mask), model.encode_text(full.ids, full.mask),
                              atol=1e-6)


def test_locked_image_tower_trains_only_its_projection_from_cached_features(tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path / "run"), steps=3)
    cfg.model.image = ImageTowerConfig(kind="encoder", locked=True,
                                       encoder=EncoderConfig(name="tiny-vit", image_size=16, options={"patch": 4}))
    trainer = ClipTrainer(cfg)
    torch.manual_seed(cfg.train.seed)
    model = trainer.run()
    saved = load_file(str(tmp_path / "run/checkpoint/model.safetensors"))
    trained_visual = {k for k in saved if k.startswith("visual.")}
    assert trained_visual == {"visual.proj.weight"}
    assert len(list((tmp_path / "run/cache").glob("image-*.npy"))) == 1
    # The trunk is unchanged: a fresh build from the same seed gives the same trunk weights.
    torch.manual_seed(cfg.train.seed)
    fresh = ClipModel(cfg.model, model.tokenizer)
    for name, p in fresh.visual.encoder.state_dict().items():
        assert torch.equal(p, model.visual.encoder.state_dict()[name]), name


@pytest.mark.real
def test_packaged_minilm_text_tower_loads_and_saves_offline(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    try:
        model = ClipModel(ClipModelConfig(
            image=ImageTowerConfig(image_size=16, patch_size=4, width=32, layers=1, head_width=16),
            text=TextTowerConfig(kind="hf", source="packaged:all-minilm-l6-v2", context_length=16), embed_dim=24),
            CaptionTokenizer.from_pretrained(_minilm(), 16))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    emb = model.encode_captions(CAPTIONS)
    assert emb.shape == (4, 24) and torch.allclose(emb.norm(dim=-1), torch.ones(4))
    model.save(tmp_path / "m")
    back = ClipModel.load(tmp_path / "m")
    assert torch.allclose(back.encode_captions(CAPTIONS), emb, atol=1e-6)


def _minilm() -> str:
    from chiasm.bridges.bert_init import resolve_source

    return resolve_source("packaged:all-minilm-l6-v2")[0]


def test_an_unreachable_hub_text_tower_says_how_to_use_a_local_copy(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config(str(tmp_path / "run"))
    cfg.model.text = TextTowerConfig(kind="hf", source="sentence-transformers/not-here-model", context_length=16)
    with pytest.raises(FileNotFoundError, match="set the source to that folder"):
        ClipTrainer(cfg).run()


def test_a_transformers_vision_tower_as_the_image_tower_saves_and_loads_without_its_source(tmp_path: Path) -> None:
    import shutil

    from chiasm.testing import make_tiny_vision_tower

    tower = make_tiny_vision_tower(tmp_path / "tower", family="siglip")
    cfg = tiny_config(str(tmp_path / "run"), steps=2)
    cfg.model.image = ImageTowerConfig(kind="encoder", encoder=EncoderConfig(name="hf-vision", source=str(tower)))
    model = ClipTrainer(cfg).run()
    shutil.rmtree(tower)
    back = ClipModel.load(tmp_path / "run/model")
    size = back.preprocessing.output_size
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert torch.allclose(back.encode_image(pixels), model.encode_image(pixels), atol=1e-6)
