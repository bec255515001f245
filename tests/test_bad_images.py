"""Broken, hostile or misplaced image files are refused with the image, the sample and the data file named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from chiasm.data import images as images_module
from chiasm.data.images import load_image
from chiasm.data.llava import load_llava
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.features import FeatureCache
from chiasm.model import VisionLanguageModel
from chiasm.processor import Prepared
from chiasm.train.skips import SkipLog, drop_bad_images

WHERE = r"\[file data\.json, sample 's7'\] "


def _refused(path: Path, pattern: str) -> DataError:
    with pytest.raises(DataError, match=WHERE + pattern) as info:
        load_image(path, sample_id="s7", source="data.json")
    assert info.value.image == str(path) and info.value.sample_id == "s7" and info.value.source == "data.json"
    return info.value


def _png(path: Path, size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (9, 99, 199)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_missing_empty_directory_and_text_files(tmp_path: Path) -> None:
    _refused(tmp_path / "gone.png", r"image not found: .*gone\.png$")
    (tmp_path / "empty.png").write_bytes(b"")
    _refused(tmp_path / "empty.png", r"image file is empty \(0 bytes\): .*empty\.png$")
    (tmp_path / "folder.png").mkdir()
    _refused(tmp_path / "folder.png", r"image path is a directory, not a file: .*folder\.png$")
    (tmp_path / "notes.png").write_text("just some text, not an image\n")
    _refused(tmp_path / "notes.png", r"cannot decode image .*notes\.png: cannot identify image file")


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, r"cannot decode image .*cut\.jpg: image file is truncated")


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _png(tmp_path / "secret.png")
    path.chmod(0)
    try:
        if not os.access(path, os.R_OK):  # root reads anything: then the check is exercised below
            _refused(path, r"cannot read image .*secret\.png: permission denied")
    finally:
        path.chmod(0o644)
    monkeypatch.setattr(images_module.os, "access", lambda p, mode: False)
    _refused(path, r"cannot read image .*secret\.png: permission denied")


def test_permission_error_while_opening_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _png(tmp_path / "locked.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images_module.Image, "open", denied)
    _refused(path, r"cannot read image .*locked\.png: permission denied")


def test_pixel_limit_refuses_before_decoding(tmp_path: Path) -> None:
    path = _png(tmp_path / "big.png", (30, 20))
    _refused_big = r"image .*big\.png has 30x20 = 600 pixels, over the limit of 599"
    with pytest.raises(DataError, match=WHERE + _refused_big):
        load_image(path, sample_id="s7", source="data.json", max_pixels=599)
    assert load_image(path, max_pixels=600).size == (30, 20)


@pytest.mark.parametrize("size", [(12, 12), (20, 20)])  # Pillow warns above its limit, raises above twice it
def test_decompression_bomb_over_pillows_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                size: tuple[int, int]) -> None:
    path = _png(tmp_path / "bomb.png", size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    _refused(path, r"image .*bomb\.png (refused as a decompression bomb|has .* over the limit of 100)")


# ---- the sample and the data file reach every loader ---------------------------------

def _sample(sid: str, image: Path, source: str = "train.jsonl") -> Sample:
    return Sample(sid, [Turn("human", "<image>\nWhat?"), Turn("gpt", "A square.")], [image], source=source)


def test_feature_cache_names_sample_and_file_or_lists_bad_images(tiny_model: VisionLanguageModel,
                                                                 tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    paths = [str(good), str(broken)]
    owners = {str(broken): ("train.jsonl", "s2")}  # path -> (data file, sample id)
    with pytest.raises(DataError, match=r"\[file train\.jsonl, sample 's2'\] cannot decode image .*broken\.png"):
        FeatureCache.build(tiny_model.encoder, paths, owners=owners, show_progress=False)
    for cache_dir in (None, tmp_path / "cache", tmp_path / "cache"):  # in memory, built to disk, read back
        cache = FeatureCache.build(tiny_model.encoder, paths, owners=owners, on_error="skip", show_progress=False,
                                   cache_dir=cache_dir)
        assert list(cache.bad) == [str(broken)] and "cannot decode image" in cache.bad[str(broken)]
        with torch.no_grad():
            reference = tiny_model.encoder.eval()(tiny_model.encoder.preprocessing(load_image(good))[None])
        assert torch.allclose(cache.lookup([str(good)]), reference, atol=1e-2, rtol=1e-3)  # stored as fp16
        with pytest.raises(DataError, match=r"cannot decode image .*broken\.png"):
            cache.lookup([str(broken)])
    # A stage that raises must not train around images an earlier skipping run left out.
    sample = _sample("s2", broken)
    log = SkipLog("st", "train.jsonl", total=1, max_fraction=1.0)
    with pytest.raises(DataError, match=r"\[file train\.jsonl, sample 's2'\] cannot decode image"):
        drop_bad_images([sample], cache.bad, log, on_error="raise")
    assert drop_bad_images([sample, _sample("ok", good)], cache.bad, log)[0].id == "ok"
    assert log.skips["s2"].image == str(broken)


def test_collate_names_the_sample_or_drops_it(tiny_model: VisionLanguageModel, tmp_path: Path) -> None:
    good, broken = _png(tmp_path / "good.png"), tmp_path / "broken.png"
    broken.write_bytes(b"")
    samples = [_sample("ok", good), _sample("bad", broken)]
    prepared, _ = tiny_model.processor.prepare(samples)
    with pytest.raises(DataError, match=r"\[file train\.jsonl, sample 'bad'\] image file is empty"):
        tiny_model.processor.collate(prepared)
    batch = tiny_model.processor.collate(prepared, on_error="skip")
    only = tiny_model.processor.collate(prepared[:1])
    assert len(batch) == 1 and torch.equal(batch.input_ids, only.input_ids) and torch.equal(batch.pixels, only.pixels)
    assert [(e.sample_id, e.image) for e in batch.skipped] == [("bad", str(broken))]
    empty = tiny_model.processor.collate([Prepared(samples[1], prepared[1].encoded)], on_error="skip")
    assert len(empty) == 0 and empty.pixels is None and len(empty.skipped) == 1


# ---- image paths stay under the image root --------------------------------------------

def _data(tmp_path: Path, names: list[str]) -> Path:
    records = [{"id": f"r{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]}
        for i, name in enumerate(names)]
    path = tmp_path / "data" / "d.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_paths_outside_the_image_root_are_refused_unless_allowed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    inside = _png(root / "img" / "a.png")
    outside = _png(tmp_path / "elsewhere" / "b.png")
    (root / "img" / "link.png").symlink_to(outside)
    (root / "img" / "inner-link.png").symlink_to(inside)
    cases = {str(outside): "absolute", "../elsewhere/b.png": "escape", "img/link.png": "symlink"}
    for name in cases:
        path = _data(tmp_path, ["img/a.png", name])
        with pytest.raises(DataError, match=r"sample 'r1'\] line 2: image path .* leads outside the image root "
                                            r".*allow_outside_image_root"):
            load_llava(path)
        skipped = load_llava(path, on_error="skip")
        assert [s.id for s in skipped.samples] == ["r0"] and [sid for sid, _ in skipped.skipped] == ["r1"]
        allowed = load_llava(path, allow_outside_root=True)
        assert [s.images[0].resolve() for s in allowed.samples] == [inside.resolve(), outside.resolve()]
    # Inside the root is fine however it is spelled: an absolute path, a ../ that comes back, a link within.
    fine = load_llava(_data(tmp_path, [str(inside), "img/../img/a.png", "img/inner-link.png"]))
    assert all(s.images[0].resolve() == inside.resolve() for s in fine.samples)


def test_loader_tells_a_directory_from_a_missing_image(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "img" / "dir.png").mkdir(parents=True)
    with pytest.raises(DataError, match=r"sample 'r0'\] line 1: image path is not a file: .*dir\.png$"):
        load_llava(_data(tmp_path, ["img/dir.png"]))
    with pytest.raises(DataError, match=r"sample 'r0'\] line 1: image not found: .*gone\.png$"):
        load_llava(_data(tmp_path, ["img/gone.png"]))
