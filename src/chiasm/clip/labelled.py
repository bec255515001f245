"""Labelled data sets as caption pairs (digits, Fashion-MNIST) and the synthetic world's captions.

A labelled sample's captions are its class name put into prompt templates. Training uses
:data:`TRAIN_TEMPLATES` (or the config's); zero-shot evaluation uses :data:`EVAL_TEMPLATES`,
which share no template with them, so a zero-shot score measures transfer to wordings the
text tower never read.
"""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from chiasm.clip.pairs import PairSet
from chiasm.data.sample import DataError

TRAIN_TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "the {}.", "this is a {}.",
    "a small {}.", "a large {}.", "a close-up of the {}.", "a drawing of a {}.", "there is a {} here.",
    "one {}.", "a photo of the {}.", "{}", "a {} on a plain background.", "a grey {}.",
)
EVAL_TEMPLATES = (
    "a bad photo of a {}.", "a blurry photo of the {}.", "a low resolution photo of a {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.",
    "itap of a {}.", "a good photo of the {}.",
)
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
FASHION_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FASHION_HINT = "install it with: apt-get install -y dataset-fashion-mnist (or point data.path at the idx files)"


def check_templates(templates: list[str] | tuple[str, ...], where: str) -> list[str]:
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{where}: every template needs exactly one '{{}}' for the class name; bad: {bad or '[]'}")
    return list(templates)


def check_classes(classes: list[str] | tuple[str, ...], where: str) -> list[str]:
    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        key = c.strip().lower()
        if not key:
            raise ValueError(f"{where}: class {i} has an empty name")
        if key in seen:
            raise ValueError(f"{where}: duplicate class name {c!r} (classes {seen[key]} and {i}); zero-shot "
                             "could not tell them apart")
        seen[key] = i
    return list(classes)


def array_pairs(name: str, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                templates: list[str]) -> PairSet:
    """Pairs over uint8 grey images ``(N, H, W)`` with integer labels."""
    check_classes(classes, name)

    def load(i: int) -> Image.Image:
        return Image.fromarray(images[i], mode="L")

    def texts(i: int) -> list[str]:
        return [t.format(classes[labels[i]]) for t in templates]

    return PairSet(name, [f"{name}/{i}" for i in range(len(images))], load, texts,
                   labels=[int(v) for v in labels], classes=list(classes))


def _split(n: int, split: str, seed: int, test_fraction: float = 0.2) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


def digits_pairs(split: str, templates: list[str], seed: int = 0) -> PairSet:
    """scikit-learn's 1,797 8x8 digits; a fixed 80/20 split (by ``seed``) into train and test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = _split(len(d.target), split, seed)
    images = np.clip(d.images[keep] * (255 / 16), 0, 255).astype(np.uint8)
    return array_pairs(f"digits/{split}", images, d.target[keep], DIGIT_CLASSES, templates)


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-style idx file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} values, the file holds {body.size} (truncated?)")
    return body.reshape(dims)


def fashion_pairs(split: str, templates: list[str], folder: str | None = None) -> PairSet:
    """Fashion-MNIST's 60,000 training or 10,000 test images (the data set's own split)."""
    root = Path(folder) if folder else FASHION_FOLDER
    prefix = "train" if split == "train" else "t10k"
    files = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    files = [f if f.exists() else f.with_suffix("") for f in files]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({', '.join(missing)}); {FASHION_HINT}")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
    return array_pairs(f"fashion-mnist/{split}", images, labels, FASHION_CLASSES, templates)


def synthetic_pairs(n: int, seed: int, image_size: int = 224) -> PairSet:
    """Scenes of chiasm's synthetic world with their captions (several wordings per scene)."""
    from chiasm.synthetic.world import caption, render_scene, sample_scene

    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    texts = [sorted({caption(s, random.Random(f"{seed}/{i}/{k}")) for k in range(6)}) for i, s in enumerate(scenes)]
    return PairSet(f"synthetic/{seed}", [f"synthetic/{seed}/{i}" for i in range(n)],
                   lambda i: render_scene(scenes[i], image_size), lambda i: texts[i])
