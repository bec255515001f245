"""CLIP training: exact resume, streamed shards, SigLIP, the CLI verbs, and a CLIP tower inside a VLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clip_cases import tiny_config
from conftest import tiny_config as tiny_vlm_config
from safetensors.torch import load_file

from chiasm.cli import main
from chiasm.clip.config import ClipDataConfig
from chiasm.clip.model import ClipModel
from chiasm.clip.shards import write_shards
from chiasm.clip.sources import build_pairs
from chiasm.clip.train import ClipTrainer, Interrupted
from chiasm.config import EncoderConfig
from chiasm.data.llava import load_llava
from chiasm.encoders.base import build_encoder
from chiasm.model import VisionLanguageModel
from chiasm.train.batches import collate, prepare


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    ClipTrainer(tiny_config(str(tmp_path / "full"), steps=6)).run()
    cut = tiny_config(str(tmp_path / "cut"), steps=6, checkpoint_every=2)
    with pytest.raises(Interrupted):
        ClipTrainer(cut).run(stop_after_steps=3)
    ClipTrainer(cut).run(resume=True)
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "full"), rel=1e-5)
    a = load_file(str(tmp_path / "full/model/model.safetensors"))
    b = load_file(str(tmp_path / "cut/model/model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_refuses_a_changed_model(tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path / "r"), steps=4, checkpoint_every=2)
    with pytest.raises(Interrupted):
        ClipTrainer(cfg).run(stop_after_steps=2)
    cfg.model.embed_dim = 8
    with pytest.raises(ValueError, match="different model"):
        ClipTrainer(cfg).run(resume=True)


def test_training_from_streamed_shards_with_siglip(tmp_path: Path) -> None:
    write_shards(build_pairs(ClipDataConfig(kind="digits", limit=96)), tmp_path / "shards", per_shard=32)
    cfg = tiny_config(str(tmp_path / "run"), steps=5, loss="siglip")
    cfg.data = ClipDataConfig(kind="shards", path=str(tmp_path / "shards"))
    model = ClipTrainer(cfg).run()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 5 and all(loss == loss for loss in losses)  # finite, one per step
    assert model.logit_bias is not None
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert "logit_bias" in records[0] and records[0]["temperature"] == pytest.approx(0.1, rel=1e-3)


def test_cli_train_eval_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"""
output_dir = "{tmp_path / 'run'}"
[model]
embed_dim = 16
[model.image]
image_size = 8
patch_size = 4
width = 32
layers = 1
head_width = 16
[model.text]
width = 32
layers = 1
heads = 2
context_length = 12
[data]
kind = "digits"
limit = 128
[train]
steps = 3
batch_size = 32
[eval.data]
kind = "digits"
split = "test"
limit = 50
""")
    assert main(["clip", "train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "zero-shot top-1" in out and (tmp_path / "run/report.html").is_file()
    metrics = json.loads((tmp_path / "run/clip_metrics.json").read_text())
    zs = metrics["zero_shot"]
    assert zs["templates_seen_in_training"] == [] and sum(map(sum, zs["confusion"])) == 50
    assert (tmp_path / "run/confusion.png").is_file() and (tmp_path / "run/training.png").is_file()
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\n")
    assert main(["clip", "eval", "--model", str(tmp_path / "run/model"), "--data", "digits", "--limit", "20",
                 "--templates", str(templates), "--out", str(tmp_path / "ev")]) == 0
    assert "1 evaluation template(s) were used in training" in capsys.readouterr().out
    assert main(["clip", "export", str(tmp_path / "run/model"), "--format", "open_clip", str(tmp_path / "oc")]) == 0
    assert (tmp_path / "oc/open_clip_config.json").is_file()
    assert main(["clip", "shards", "--data", "digits", "--limit", "40", "--per-shard", "16",
                 "--out", str(tmp_path / "sh")]) == 0
    assert len(list((tmp_path / "sh").glob("shard-*.tar"))) == 3


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[train]\nbatch_size = 1\n")
    assert main(["clip", "train", "--config", str(config)]) == 2
    assert "at least 2 pairs per batch" in capsys.readouterr().err
    assert main(["clip", "eval", "--model", str(tmp_path), "--data", "digits"]) == 2
    assert "not a chiasm CLIP model folder" in capsys.readouterr().err


def test_clip_image_tower_is_an_encoder_of_a_vlm(tmp_path: Path, tiny_lm_dir: Path, tiny_world) -> None:
    clip = ClipTrainer(tiny_config(str(tmp_path / "clip"), steps=2)).run()
    cfg = tiny_vlm_config(tiny_lm_dir)
    cfg.encoder = EncoderConfig(name="chiasm-clip", source=str(tmp_path / "clip/model"))
    torch.manual_seed(0)
    vlm = VisionLanguageModel.build(cfg)
    assert vlm.encoder.grid() == (2, 2) and vlm.encoder.dim == 32
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # the encoder's tokens are the CLIP tower's patch tokens
        assert torch.equal(vlm.encoder(pixels), clip.visual.tokens(pixels)[:, 1:])
    samples = load_llava(tiny_world.instruct).samples[:2]
    prepared, _ = prepare(samples, vlm)
    batch = collate(prepared, vlm.tokenizer.pad_token_id, model=vlm)
    with torch.no_grad():
        logits = vlm(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels,
                     return_logits=True).logits
    vlm.save(tmp_path / "vlm")
    back = VisionLanguageModel.load(tmp_path / "vlm")
    with torch.no_grad():
        again = back(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels,
                     return_logits=True).logits
    assert torch.allclose(logits, again, atol=1e-5)
    assert back.encoder.preprocessing == ClipModel.load(tmp_path / "clip/model").preprocessing
    pooled = build_encoder(EncoderConfig(name="chiasm-clip", source=str(tmp_path / "clip/model"), options={"grid": 1}))
    with torch.no_grad():
        assert torch.allclose(pooled(pixels)[:, 0], clip.visual.tokens(pixels)[:, 1:].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="grid 3 must be between 1 and"):
        build_encoder(EncoderConfig(name="chiasm-clip", source=str(tmp_path / "clip/model"), options={"grid": 3}))


def _folder_with_a_broken_image(root: Path) -> None:
    from PIL import Image

    root.mkdir()
    lines = []
    for i in range(12):
        name = f"im{i}.png"
        if i == 5:
            (root / name).write_bytes(b"\x89PNG broken")
        else:
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / name)
        lines.append(f"{name}\tpicture number {i}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("cache_gb", [2.0, 0.0])
def test_an_undecodable_image_stops_training_or_is_skipped_and_listed(tmp_path: Path, cache_gb: float) -> None:
    from chiasm.data.sample import DataError

    _folder_with_a_broken_image(tmp_path / "imgs")
    cfg = tiny_config(str(tmp_path / "run"), steps=3, batch=4, cache_pixels_gb=cache_gb)
    cfg.data = ClipDataConfig(kind="folder", path=str(tmp_path / "imgs"))
    with pytest.raises(DataError, match=r"im5\.png"):
        ClipTrainer(cfg).run()
    cfg.data.on_error = "skip"
    cfg.output_dir = str(tmp_path / "run2")
    ClipTrainer(cfg).run()
    skipped = [json.loads(x) for x in (tmp_path / "run2/skipped.jsonl").read_text().splitlines()]
    assert [s["sample"].endswith("im5.png") for s in skipped] == [True]
