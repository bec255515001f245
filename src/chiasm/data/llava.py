"""Reader and writer for the LLaVA conversation format (JSON list or JSONL).

A record looks like::

    {"id": "000123", "image": "coco/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Public LLaVA-style datasets are large and hand-assembled, so they contain broken
records. Every check here runs at load time, before any GPU time is spent, and
each failure names the file, the sample id and (for JSONL) the line, so a bad
record can be found and fixed in seconds rather than inferred from a crash in
the collator hours into a run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chiasm.data.sample import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, DataError, Sample, Turn

# Other tools write OpenAI-style role names; they mean the same speakers.
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}
_RESERVED = ("id", "image", "audio", "conversations")
# Spellings a person may mean as the placeholder (<Image>, < image >, <IMAGE>): the placeholder is
# matched exactly, so these would silently be trained on as text, or leave their image unplaced.
_LOOKALIKE = re.compile(r"<\s*image\s*>", re.IGNORECASE)


@dataclass
class LoadResult:
    """Samples read from one file, plus the records left out in ``on_error="skip"`` mode.

    Skipped records are returned rather than logged so that a caller can report
    or threshold them (a file where half the records are broken is not fine).
    """

    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_llava(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    check_images: bool = True,
    allow_outside_root: bool = False,
) -> LoadResult:
    """Read and validate a LLaVA JSON or JSONL file.

    The format is chosen by content: a ``.jsonl`` file, or any file whose first
    non-blank character is not ``[``, is read one record per line. Image paths
    are resolved against ``image_root`` (default: the data file's folder).
    With ``on_error="skip"`` invalid records are collected in ``skipped``;
    errors that make the whole file unreadable still raise.

    An image path that leads outside the image root (an absolute path elsewhere, a
    ``../`` escape, a symlink resolving elsewhere) is refused unless
    ``allow_outside_root``: a data file should not be able to make training read
    arbitrary files of the machine, and a path leaving the dataset is usually a mistake.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path = Path(path)
    source = str(path)
    root = Path(image_root) if image_root is not None else path.parent
    result = LoadResult()
    seen: set[str] = set()
    for label, item in _raw_records(_read_text(path), path):
        try:
            if isinstance(item, DataError):
                raise item
            sample = _parse_record(item, label, source, root, check_images, allow_outside_root)
            if sample.id in seen:
                raise DataError(f"{label}: duplicate id", source=source, sample_id=sample.id)
            seen.add(sample.id)
            result.samples.append(sample)
        except DataError as exc:
            if on_error == "raise":
                raise
            result.skipped.append((exc.sample_id if exc.sample_id is not None else label, str(exc)))
    return result


def save_llava(samples: list[Sample], path: str | Path, image_root: str | Path) -> None:
    """Write ``samples`` so that :func:`load_llava` reads them back unchanged.

    JSONL is written when the suffix is ``.jsonl``, otherwise a JSON list. Image
    paths are stored relative to ``image_root`` so the data folder can move.
    The file is replaced atomically, so a crash never leaves half a file that a
    later run would mistake for a complete one.
    """
    path = Path(path)
    root = Path(image_root)
    lines = []
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise DataError("duplicate id", source=str(path), sample_id=sample.id)
        seen.add(sample.id)
        lines.append(_dump(sample, root, str(path)))
    if path.suffix.lower() == ".jsonl":
        text = "".join(line + "\n" for line in lines)
    else:
        # One record per line: still a JSON list, but diffable and greppable by id.
        text = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_text(path: Path) -> str:
    source = str(path)
    try:
        # utf-8-sig: some editors and spreadsheet exports start UTF-8 files with a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("data file not found", source=source) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text: {exc}; save the file as UTF-8", source=source) from None
    except IsADirectoryError:
        raise DataError("the data file is a folder; give a JSON or JSONL file", source=source) from None
    except OSError as exc:
        raise DataError(f"cannot read data file: {exc}", source=source) from exc


def _non_finite(value: Any, where: str) -> str | None:
    """The key path of the first NaN or infinite number in ``value``, if any.

    Python's json reads NaN, Infinity and overflowing numbers (1e999) as floats; no answer,
    score or id is one, and a NaN answer would be scored as the text "nan".
    """
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key!r}]" if isinstance(key, str) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


_TOO_DEEP = "JSON nested too deeply to read (no LLaVA record nests more than a few levels)"


def _raw_records(text: str, path: Path) -> list[tuple[str, Any]]:
    """Split a file into ``(location label, parsed record or DataError)`` pairs.

    A malformed JSONL line becomes a DataError item instead of raising, so skip
    mode can drop just that line; a malformed JSON list has no usable parts.
    """
    source = str(path)
    stripped = text.lstrip()
    if not stripped:
        raise DataError("data file is empty", source=source)
    if path.suffix.lower() != ".jsonl" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", source=source
            ) from None
        except RecursionError:
            raise DataError(_TOO_DEEP, source=source) from None
        return [(f"record [{i}]", record) for i, record in enumerate(data)]
    items: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label = f"line {lineno}"
        try:
            items.append((label, json.loads(line)))
        except json.JSONDecodeError as exc:
            items.append((label, DataError(f"{label}: malformed JSON at column {exc.colno}: {exc.msg}", source=source)))
        except RecursionError:
            items.append((label, DataError(f"{label}: {_TOO_DEEP}", source=source)))
    return items


def _parse_record(record: Any, label: str, source: str, root: Path, check_images: bool,
                  allow_outside_root: bool = False) -> Sample:
    if not isinstance(record, dict):
        raise DataError(f"{label}: record must be a JSON object, got {type(record).__name__}", source=source)
    raw_id = record.get("id")
    if raw_id is None:
        raise DataError(f"{label}: record has no 'id'", source=source)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or raw_id == "":
        raise DataError(f"{label}: 'id' must be a non-empty string or an integer, got {raw_id!r}", source=source)
    sample_id = str(raw_id)

    def fail(message: str) -> DataError:
        return DataError(f"{label}: {message}", source=source, sample_id=sample_id)

    bad_number = _non_finite(record, "record")
    if bad_number is not None:
        raise fail(f"{bad_number} is not a finite number (NaN, Infinity or too large for a float); "
                   "quote it if it is text")
    turns = _parse_turns(record.get("conversations"), fail)
    images = _media(record, "image", IMAGE_PLACEHOLDER, turns, root, fail, check_images, allow_outside_root)
    audios = _media(record, "audio", AUDIO_PLACEHOLDER, turns, root, fail, check_images, allow_outside_root)
    meta = {key: value for key, value in record.items() if key not in _RESERVED}
    return Sample(id=sample_id, conversations=turns, images=images, meta=meta, source=source, audios=audios)


def _media(record: dict, key: str, placeholder: str, turns: list[Turn], root: Path, fail: Callable[[str], DataError],
           check_files: bool, allow_outside_root: bool) -> list[Path]:
    """The files listed under ``key`` ("image" or "audio"): as many as their placeholders, inside the root, present."""
    names = _parse_image_names(record.get(key), fail, key)
    placeholders = sum(turn.text.count(placeholder) for turn in turns)
    what = "audio clip(s)" if key == "audio" else "image(s)"
    if placeholders != len(names):
        raise fail(f"{placeholders} {placeholder} placeholder(s) in the conversation but {len(names)} {what} listed")
    files = [root / name for name in names]
    if not allow_outside_root:
        for name, file in zip(names, files, strict=True):
            if not _inside(file, root):
                raise fail(f"{key} path {name!r} leads outside the image root {root} (to {file.resolve()}); "
                           "set allow_outside_image_root = true to allow it")
    if check_files:
        for file in files:
            try:
                found = file.is_file()
                exists = found or file.exists()
            except OSError as exc:  # e.g. a name longer than the file system allows
                raise fail(f"cannot look up {key} {file}: {exc.strerror}") from None
            if not found:
                raise fail(f"{key} path is not a file: {file}" if exists else f"{key} not found: {file}")
    return files


def _parse_turns(raw: Any, fail: Callable[[str], DataError]) -> list[Turn]:
    """Check roles, alternation and placeholders; the collator relies on all three."""
    if not isinstance(raw, list):
        raise fail("'conversations' is missing or not a list")
    if not raw:
        raise fail("'conversations' is empty")
    turns: list[Turn] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise fail(f"turn {i} must be an object with 'from' and 'value'")
        role = _ROLES.get(item.get("from")) if isinstance(item.get("from"), str) else None
        if role is None:
            raise fail(f"turn {i} has unknown role {item.get('from')!r} (expected human, gpt or system)")
        text = item.get("value")
        if not isinstance(text, str):
            raise fail(f"turn {i} value must be a string, got {type(text).__name__}")
        if not text.strip():
            raise fail(f"turn {i} ({role}) is empty; every turn needs text (an answer of nothing teaches nothing)")
        wrong = [m for m in _LOOKALIKE.findall(text) if m != IMAGE_PLACEHOLDER]
        if wrong:
            raise fail(f"turn {i} holds {wrong[0]!r}, which is not the image placeholder: write it exactly "
                       f"{IMAGE_PLACEHOLDER} (lower case, no spaces)")
        if role != "human" and IMAGE_PLACEHOLDER in text:
            raise fail(f"turn {i} ({role}) contains {IMAGE_PLACEHOLDER}; only human turns may hold images")
        turns.append(Turn(role, text))
    body = turns[1:] if turns[0].role == "system" else turns
    if not body:
        raise fail("conversation has only a system turn")
    offset = len(turns) - len(body)
    for i, turn in enumerate(body):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.role != expected:
            raise fail(
                f"turn {i + offset} is {turn.role} but {expected} was expected "
                "(turns must alternate human/gpt, starting with human, after an optional system turn)"
            )
    if body[-1].role != "gpt":
        raise fail("conversation must end with a gpt turn")
    return turns


def _parse_image_names(raw: Any, fail: Callable[[str], DataError], key: str = "image") -> list[str]:
    if raw is None:
        return []
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(n, str) and n and "\0" not in n for n in names):
        raise fail(f"'{key}' must be a non-empty string (without NUL characters) or a list of them, got {raw!r}")
    return names


def _inside(image: Path, root: Path) -> bool:
    """Whether ``image``, with ``..`` and symlinks resolved, lies under ``root`` (also resolved)."""
    try:
        image.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _relative(image: Path, root: Path) -> str:
    """Path under ``root`` if it is there (literally or once resolved), else absolute."""
    try:
        return image.relative_to(root).as_posix()
    except ValueError:
        pass
    try:
        return image.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(image.resolve())


def _dump(sample: Sample, root: Path, source: str) -> str:
    """One record as a single line of JSON."""
    record: dict[str, Any] = {"id": sample.id}
    names = [_relative(image, root) for image in sample.images]
    if len(names) == 1:
        record["image"] = names[0]
    elif names:
        record["image"] = names
    if sample.audios:
        record["audio"] = [_relative(clip, root) for clip in sample.audios]
    record["conversations"] = [{"from": turn.role, "value": turn.text} for turn in sample.conversations]
    for key, value in sample.meta.items():
        if key in _RESERVED:
            raise DataError(f"meta key {key!r} clashes with a record field", source=source, sample_id=sample.id)
        record[key] = value
    try:
        return json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"meta is not JSON-serialisable: {exc}", source=source, sample_id=sample.id) from None
