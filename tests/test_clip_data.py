"""CLIP data: caption sources, tar shards, templates and class lists, and the errors bad input gets."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from chiasm.clip.config import ClipDataConfig, ClipRunConfig, ClipTrainConfig, check_clip_config
from chiasm.clip.labelled import EVAL_TEMPLATES, TRAIN_TEMPLATES, check_classes, check_templates, read_idx
from chiasm.clip.pairs import folder_pairs, llava_pairs
from chiasm.clip.shards import iter_shard, shard_files, stream, write_shards
from chiasm.clip.sources import build_pairs
from chiasm.clip.tokenizer import CaptionTokenizer
from chiasm.data.sample import DataError


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (10, 10), (20 * i, 0, 0)).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def test_eval_templates_are_held_out_from_training() -> None:
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)


def test_folder_with_captions_jsonl_and_tsv(tmp_path: Path) -> None:
    names = _images(tmp_path / "a", 3)
    (tmp_path / "a" / "captions.jsonl").write_text(
        "\n".join(json.dumps({"image": n, "caption": f"picture {i}"}) for i, n in enumerate(names)))
    pairs = folder_pairs(str(tmp_path / "a"))
    assert len(pairs) == 3 and pairs.captions(2) == ["picture 2"] and pairs.image(1).size == (10, 10)
    names = _images(tmp_path / "b", 2)
    (tmp_path / "b" / "captions.tsv").write_text("im0.png\tfirst\nim1.png\tsecond\n")
    assert folder_pairs(str(tmp_path / "b")).captions(1) == ["second"]


def test_folder_errors_name_the_file_and_skip_counts(tmp_path: Path) -> None:
    _images(tmp_path, 2)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "im0.png", "caption": "ok"}) + "\n"
                                             + json.dumps({"image": "gone.png", "caption": "x"}) + "\n"
                                             + json.dumps({"image": "im1.png", "caption": "  "}) + "\n")
    with pytest.raises(DataError, match=r"captions.jsonl:2: image gone.png not found"):
        folder_pairs(str(tmp_path))
    pairs = folder_pairs(str(tmp_path), on_error="skip")
    assert len(pairs) == 1 and [why for _, why in pairs.skipped] == ["image gone.png not found", "empty caption"]
    (tmp_path / "captions.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"no captions\.jsonl or captions\.tsv"):
        folder_pairs(str(tmp_path))


def test_undecodable_image_is_named_when_read(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "captions.tsv").write_text("bad.png\ta caption\n")
    pairs = folder_pairs(str(tmp_path))
    with pytest.raises(DataError, match=r"bad\.png"):
        pairs.image(0)


def test_llava_file_gives_first_answers_as_captions(tmp_path: Path) -> None:
    names = _images(tmp_path, 2)
    records = [{"id": str(i), "image": n, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                            {"from": "gpt", "value": f"caption {i}"}]}
               for i, n in enumerate(names)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    pairs = llava_pairs(str(tmp_path / "d.json"), str(tmp_path))
    assert [pairs.captions(i) for i in range(2)] == [["caption 0"], ["caption 1"]]


def test_shards_round_trip_and_split_over_readers(tmp_path: Path) -> None:
    pairs = build_pairs(ClipDataConfig(kind="digits", limit=23))
    files = write_shards(pairs, tmp_path / "shards", per_shard=5)
    assert len(files) == 5 and shard_files(str(tmp_path / "shards")) == files
    back = list(stream(files))
    assert [s.captions for s in back] == [pairs.captions(i) for i in range(23)]
    assert [s.label for s in back] == pairs.labels[:23]
    assert back[4].image.convert("L").tobytes() == pairs.image(4).tobytes()
    # 2 ranks x 2 workers (fewer shards than readers for 3 files too): every sample read exactly once.
    for subset in (files, files[:3]):
        total = sum(1 for f in subset for _ in iter_shard(f))
        keys = [(s.shard, s.key) for r in range(2) for w in range(2)
                for s in stream(subset, rank=r, world=2, worker=w, workers=2)]
        assert len(keys) == len(set(keys)) == total


def test_broken_shard_members_are_named_or_counted(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", b"garbage"), ("a.txt", b"cap"), ("b.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"s.tar:a"):
        list(iter_shard(path))
    skipped: list = []
    assert list(iter_shard(path, on_error="skip", skipped=skipped)) == []
    assert [w for w, _ in skipped] == ["s.tar:a", "s.tar:b"]
    (tmp_path / "x.tar").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable tar shard"):
        list(iter_shard(tmp_path / "x.tar"))


def test_captions_empty_or_too_long() -> None:
    tok = CaptionTokenizer.train(["a b c d e f g h"] * 4, 50, 5)
    with pytest.raises(DataError, match="s1: empty caption"):
        tok.encode(["a b", " "], names=["s0", "s1"])
    enc = tok.encode(["a b c d e f g h", "a b"])
    assert enc.truncated == 1 and enc.ids.shape == (2, 5) and enc.ids[0, -1] == tok.eos_id
    refuse = CaptionTokenizer(tok.backend, 5, too_long="refuse")
    with pytest.raises(DataError, match="longer than the text tower's context of 5"):
        refuse.encode(["a b c d e f g h"])


def test_duplicate_classes_and_bad_templates_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate class name 'Cat'"):
        check_classes(["cat", "dog", "Cat"], "classes")
    with pytest.raises(ValueError, match="exactly one"):
        check_templates(["a photo of a cat."], "templates")


def test_a_batch_of_one_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="at least 2 pairs per batch"):
        check_clip_config(ClipRunConfig(train=ClipTrainConfig(batch_size=1)))


def test_idx_reader_refuses_truncated_files(tmp_path: Path) -> None:
    good = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    (tmp_path / "ok.idx").write_bytes(good)
    assert read_idx(tmp_path / "ok.idx").tolist() == [1, 2, 3]
    (tmp_path / "cut.idx").write_bytes(good[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut.idx")


def test_synthetic_world_pairs_have_several_wordings() -> None:
    pairs = build_pairs(ClipDataConfig(kind="synthetic", limit=5))
    assert len(pairs) == 5 and pairs.image(0).size == (224, 224)
    assert all(len(pairs.captions(i)) >= 1 for i in range(5))
    assert pairs.captions(0) != build_pairs(ClipDataConfig(kind="synthetic", limit=5, split="test")).captions(0)
