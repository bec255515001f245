"""LLaVA files: every broken record is reported with file, sample id and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from chiasm.data.llava import load_llava, save_llava
from chiasm.data.sample import DataError, Sample, Turn


def _image(root: Path, name: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    return path


def _record(sid: Any = "a", image: Any = "img/a.png", **extra: Any) -> dict[str, Any]:
    """A valid record; without an image the question carries no placeholder."""
    record: dict[str, Any] = {"id": sid}
    if image is not None:
        record["image"] = image
    record["conversations"] = [
        {"from": "human", "value": "What is it?" if image is None else "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A red square."},
    ]
    record.update(extra)
    return record


def _write(path: Path, records: list[Any]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", "utf-8")
    else:
        path.write_text(json.dumps(records), "utf-8")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _image(tmp_path, "img/a.png")
    _image(tmp_path, "img/b.png")
    return tmp_path


def test_reads_json_with_aliases_system_turn_and_meta(root: Path) -> None:
    record = _record(source_dataset="coco", score=0.5)
    record["conversations"] = [
        {"from": "system", "value": "Be brief."},
        {"from": "user", "value": "<image>\nWhat is it?"},
        {"from": "assistant", "value": "A square."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Red."},
    ]
    result = load_llava(_write(root / "d.json", [record, _record(7, None)]))
    assert result.skipped == []
    first, second = result.samples
    assert first.id == "a"
    assert [t.role for t in first.conversations] == ["system", "human", "gpt", "human", "gpt"]
    assert first.images == [root / "img/a.png"]
    assert first.meta == {"source_dataset": "coco", "score": 0.5}
    assert first.source == str(root / "d.json")
    assert second.id == "7"
    assert second.images == []


def test_jsonl_with_blank_lines_and_image_root(tmp_path: Path) -> None:
    images = tmp_path / "elsewhere"
    _image(images, "img/a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_record()) + "\n\n" + json.dumps(_record("b", None)) + "\n", "utf-8")
    result = load_llava(path, image_root=images)
    assert [s.id for s in result.samples] == ["a", "b"]
    assert result.samples[0].images == [images / "img/a.png"]


def test_jsonl_content_in_other_suffix_is_detected(root: Path) -> None:
    path = root / "d.txt"
    path.write_text(json.dumps(_record()) + "\n", "utf-8")
    assert [s.id for s in load_llava(path).samples] == ["a"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip(root: Path, suffix: str) -> None:
    samples = [
        Sample("one", [Turn("system", "Sys."), Turn("human", "<image>\nQ?"), Turn("gpt", "A.")],
               [root / "img/a.png"], {"k": [1, 2], "name": "é"}),
        Sample("two", [Turn("human", "<image> and <image>"), Turn("gpt", "Two.")],
               [root / "img/a.png", root / "img/b.png"]),
        Sample("three", [Turn("human", "No image."), Turn("gpt", "Fine.")]),
    ]
    path = root / f"out{suffix}"
    save_llava(samples, path, root)
    text = path.read_text("utf-8")
    assert "img/a.png" in text and str(root) not in text  # stored relative to image_root
    loaded = load_llava(path).samples
    assert [(s.id, s.conversations, s.images, s.meta) for s in loaded] == [
        (s.id, s.conversations, s.images, s.meta) for s in samples
    ]
    save_llava(loaded, path.with_name("again" + suffix), root)
    assert path.with_name("again" + suffix).read_text("utf-8") == text


def test_save_rejects_meta_clashing_with_fields(tmp_path: Path) -> None:
    sample = Sample("x", [Turn("human", "q"), Turn("gpt", "a")], meta={"image": "y"})
    with pytest.raises(DataError, match=r"sample 'x'.*meta key 'image'"):
        save_llava([sample], tmp_path / "o.json", tmp_path)


def _conv(*pairs: tuple[Any, Any]) -> list[dict[str, Any]]:
    return [{"from": role, "value": value} for role, value in pairs]


INVALID = [
    ("not_object", ["just a string"], r"record must be a JSON object"),
    ("no_id", [{"conversations": _conv(("human", "q"), ("gpt", "a"))}], r"record has no 'id'"),
    ("no_conversations", [{"id": "s"}], r"sample 's'.*'conversations' is missing"),
    ("empty_conversations", [{"id": "s", "conversations": []}], r"sample 's'.*'conversations' is empty"),
    ("bad_role", [{"id": "s", "conversations": _conv(("bot", "q"), ("gpt", "a"))}],
     r"sample 's'.*turn 0 has unknown role 'bot'"),
    ("non_string_value", [{"id": "s", "conversations": _conv(("human", 3), ("gpt", "a"))}],
     r"sample 's'.*turn 0 value must be a string"),
    ("starts_with_gpt", [{"id": "s", "conversations": _conv(("gpt", "a"), ("human", "q"))}],
     r"sample 's'.*turn 0 is gpt but human was expected"),
    ("not_alternating", [{"id": "s", "conversations": _conv(("human", "q"), ("human", "q"), ("gpt", "a"))}],
     r"sample 's'.*turn 1 is human but gpt was expected"),
    ("ends_with_human", [{"id": "s", "conversations": _conv(("human", "q"), ("gpt", "a"), ("human", "q"))}],
     r"sample 's'.*must end with a gpt turn"),
    ("too_few_placeholders", [_record("s", ["img/a.png", "img/b.png"])],
     r"sample 's'.*1 <image> placeholder\(s\) in the conversation but 2 image\(s\) listed"),
    ("placeholder_without_image", [{"id": "s", "conversations": _conv(("human", "<image>"), ("gpt", "a"))}],
     r"sample 's'.*1 <image> placeholder\(s\) in the conversation but 0 image\(s\) listed"),
    ("placeholder_in_gpt", [{"id": "s", "image": "img/a.png",
                             "conversations": _conv(("human", "q"), ("gpt", "<image>"))}],
     r"sample 's'.*turn 1 \(gpt\) contains <image>"),
    ("missing_image", [_record("s", "img/missing.png")], r"sample 's'.*image not found: .*img/missing\.png"),
    ("duplicate_id", [_record("s"), _record("s")], r"sample 's'.*duplicate id"),
]


@pytest.mark.parametrize(("name", "records", "pattern"), INVALID, ids=[case[0] for case in INVALID])
def test_invalid_record_names_file_and_sample(root: Path, name: str, records: list[Any], pattern: str) -> None:
    path = _write(root / f"{name}.json", records)
    with pytest.raises(DataError, match=rf"file .*{name}\.json.*{pattern}"):
        load_llava(path)


def test_missing_image_not_checked_when_disabled(root: Path) -> None:
    path = _write(root / "d.json", [_record("s", "img/missing.png")])
    assert load_llava(path, check_images=False).samples[0].images == [root / "img/missing.png"]


def test_jsonl_errors_carry_line_numbers(root: Path) -> None:
    path = root / "d.jsonl"
    path.write_text(json.dumps(_record("a")) + "\n\n" + json.dumps(_record("b", "img/gone.png")) + "\n", "utf-8")
    with pytest.raises(DataError, match=r"file .*d\.jsonl, sample 'b'\] line 3: image not found"):
        load_llava(path)


def test_malformed_jsonl_line_is_reported_and_skippable(root: Path) -> None:
    path = root / "d.jsonl"
    path.write_text(json.dumps(_record("a")) + '\n{"id": "b", "conv\n' + json.dumps(_record("c", None)) + "\n", "utf-8")
    with pytest.raises(DataError, match=r"file .*d\.jsonl\] line 2: malformed JSON"):
        load_llava(path)
    result = load_llava(path, on_error="skip")
    assert [s.id for s in result.samples] == ["a", "c"]
    assert [sid for sid, _ in result.skipped] == ["line 2"]


def test_malformed_json_file_raises_even_in_skip_mode(root: Path) -> None:
    path = root / "d.json"
    path.write_text('[{"id": "a",\n "conversations": ]', "utf-8")
    with pytest.raises(DataError, match=r"file .*d\.json\] malformed JSON at line 2"):
        load_llava(path, on_error="skip")


def test_missing_or_empty_data_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"file .*absent\.json\] data file not found"):
        load_llava(tmp_path / "absent.json")
    (tmp_path / "empty.jsonl").write_text("\n \n", "utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl\] data file is empty"):
        load_llava(tmp_path / "empty.jsonl")


def test_skip_mode_keeps_good_records_and_lists_bad_ones(root: Path) -> None:
    records = [
        _record("ok1"),
        _record("bad_image", "img/missing.png"),
        {"conversations": []},
        _record("ok2", "img/b.png"),
        _record("ok1"),
        {"id": "bad_turns", "conversations": _conv(("human", "q"))},
    ]
    result = load_llava(_write(root / "d.json", records), on_error="skip")
    assert [s.id for s in result.samples] == ["ok1", "ok2"]
    assert [sid for sid, _ in result.skipped] == ["bad_image", "record [2]", "ok1", "bad_turns"]
    reasons = dict(result.skipped)
    assert "image not found" in reasons["bad_image"]
    assert "duplicate id" in reasons["ok1"]
    assert "end with a gpt turn" in reasons["bad_turns"]


# ---- numbers, blank turns, look-alike placeholders, byte-order marks -------------------------
def test_non_finite_numbers_are_named_by_key_and_skipped_alone(tmp_path: Path) -> None:
    _image(tmp_path, "img/a.png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_record("a")) + "\n"
                    + json.dumps(_record("b")).replace('"id"', '"meta": {"scores": [1.0, NaN]}, "id"') + "\n"
                    + json.dumps(_record("c")).replace('"id"', '"answer": 1e999, "id"') + "\n")
    with pytest.raises(DataError) as info:
        load_llava(path)
    assert str(info.value) == (f"[file {path}, sample 'b'] line 2: record['meta']['scores'][1] is not a finite "
                               "number (NaN, Infinity or too large for a float); quote it if it is text")
    result = load_llava(path, on_error="skip")
    assert [s.id for s in result.samples] == ["a"]
    assert [sid for sid, _ in result.skipped] == ["b", "c"]
    assert "record['answer']" in result.skipped[1][1]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_a_blank_turn_is_refused(tmp_path: Path, text: str) -> None:
    record = _record("a", image=None)
    record["conversations"][1]["value"] = text
    with pytest.raises(DataError, match=r"sample 'a'\] record \[0\]: turn 1 \(gpt\) is empty"):
        load_llava(_write(tmp_path / "d.json", [record]))


@pytest.mark.parametrize("spelling", ["<Image>", "<IMAGE>", "< image >", "<image >"])
def test_a_look_alike_placeholder_is_refused(tmp_path: Path, spelling: str) -> None:
    record = _record("a", image=None)
    record["conversations"][0]["value"] = f"{spelling}\nWhat is it?"
    with pytest.raises(DataError, match="not the image placeholder") as info:
        load_llava(_write(tmp_path / "d.json", [record]))
    assert repr(spelling) in str(info.value)


def test_a_utf8_byte_order_mark_is_read(tmp_path: Path) -> None:
    _image(tmp_path, "img/a.png")
    for name in ("d.json", "d.jsonl"):
        path = _write(tmp_path / name, [_record("a")])
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert [s.id for s in load_llava(path).samples] == ["a"]
