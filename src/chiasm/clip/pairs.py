"""Image-caption pairs: one small interface over every source (files, labelled sets, shards).

A :class:`PairSet` is map-style: ``image(i)`` decodes sample ``i`` (lazily, naming the file on
failure) and ``captions(i)`` lists the texts that describe it (a labelled sample has one per
template; training draws one per visit). ``label(i)`` exists for labelled sets, whose class
names make zero-shot classification possible.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from chiasm.data.images import load_image
from chiasm.data.sample import DataError


@dataclass
class PairSet:
    name: str
    ids: list[str]  # what names sample i in an error (a file, or "digits/test/17")
    load: Callable[[int], Image.Image]
    texts: Callable[[int], list[str]]
    labels: list[int] | None = None
    classes: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample, why), on_error = "skip"

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> Image.Image:
        return self.load(i)

    def captions(self, i: int) -> list[str]:
        return self.texts(i)

    def subset(self, keep: list[int]) -> PairSet:
        """The pairs at ``keep`` (e.g. all but those whose image failed to decode), in that order."""
        keep = list(keep)
        return PairSet(self.name, [self.ids[i] for i in keep], lambda j: self.load(keep[j]),
                       lambda j: self.texts(keep[j]), labels=[self.labels[i] for i in keep] if self.labels else None,
                       classes=self.classes, skipped=list(self.skipped))

    def label(self, i: int) -> int:
        if self.labels is None:
            raise ValueError(f"{self.name} has no class labels (zero-shot needs a labelled set)")
        return self.labels[i]


def file_pairs(name: str, files: Sequence[Path], captions: Sequence[str], source: str) -> PairSet:
    files, captions = list(files), list(captions)

    def load(i: int) -> Image.Image:
        return load_image(files[i], sample_id=str(files[i].name), source=source)

    return PairSet(name, [str(f) for f in files], load, lambda i: [captions[i]])


def llava_pairs(path: str, image_root: str | None, on_error: str = "raise") -> PairSet:
    """A LLaVA file's single-image samples; the caption is the first assistant turn.

    That is how LLaVA's own caption data (the 558k alignment set) is laid out: a generic
    "describe the image" question and the caption as the answer.
    """
    from chiasm.data.llava import load_llava

    result = load_llava(path, image_root, on_error=on_error, check_images=False)
    files, captions, skipped = [], [], list(result.skipped)
    for s in result.samples:
        answers = [t.text for t in s.conversations if t.role == "gpt"]
        if len(s.images) != 1 or not answers or not answers[0].strip():
            why = "needs exactly one image and a non-empty first answer to serve as its caption"
            if on_error == "raise":
                raise DataError(why, source=str(path), sample_id=s.id)
            skipped.append((s.id, why))
            continue
        files.append(s.images[0])
        captions.append(answers[0])
    pairs = file_pairs(Path(path).name, files, captions, str(path))
    pairs.skipped = skipped
    return pairs


def folder_pairs(folder: str, on_error: str = "raise") -> PairSet:
    """A folder of images and ``captions.jsonl`` (``{"image": ..., "caption": ...}``) or ``captions.tsv``."""
    root = Path(folder)
    jsonl, tsv = root / "captions.jsonl", root / "captions.tsv"
    rows: list[tuple[str, str, str]] = []  # (where, image, caption)
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rows.append((f"{jsonl}:{n}", str(rec["image"]), str(rec["caption"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"line {n}: not a {{\"image\": ..., \"caption\": ...}} record ({exc})",
                                source=str(jsonl)) from None
    elif tsv.is_file():
        with tsv.open(newline="") as fh:
            for n, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
                if len(row) != 2:
                    raise DataError(f"line {n}: expected 'image<TAB>caption', got {len(row)} fields", source=str(tsv))
                rows.append((f"{tsv}:{n}", row[0], row[1]))
    else:
        raise FileNotFoundError(f"{root}: no captions.jsonl or captions.tsv (one caption per image file)")
    files, captions, skipped = [], [], []
    for where, image, caption in rows:
        path = (root / image).resolve()
        problem = None
        if not path.is_file():
            problem = f"image {image} not found"
        elif not caption.strip():
            problem = "empty caption"
        if problem:
            if on_error == "raise":
                raise DataError(f"{where}: {problem}", source=str(root), sample_id=image)
            skipped.append((image, problem))
            continue
        files.append(path)
        captions.append(caption)
    pairs = file_pairs(root.name, files, captions, str(root))
    pairs.skipped = skipped
    return pairs
