"""Broken or missing images must fail with the path, sample and file named."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from chiasm.data.images import load_image
from chiasm.data.sample import DataError


def test_loads_any_mode_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("LA", (8, 6), (100, 255)).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (8, 6)
    assert image.getpixel((0, 0)) == (100, 100, 100)


def test_missing_file_names_path_sample_and_source(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(DataError, match=r"file data\.json, sample 's1'.*image not found: .*nope\.png") as info:
        load_image(path, sample_id="s1", source="data.json")
    assert info.value.sample_id == "s1"
    assert info.value.source == "data.json"


def test_garbage_bytes_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError, match=r"sample 'x'.*cannot decode image .*garbage\.png"):
        load_image(path, sample_id="x")


def test_truncated_png_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot decode image .*cut\.png"):
        load_image(path)
