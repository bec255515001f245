"""Labelled image sets for diffusion: Fashion-MNIST, scikit-learn digits, a folder, the synthetic world.

Every source gives the same :class:`ImageSet`: float pixels in [-1, 1] (the range the
schedule's clipping assumes), integer labels, class names and, for the synthetic world,
captions. Each source has a fixed held-out split that training never sees, so metrics are
computed against data the model did not fit.
"""

from __future__ import annotations

import gzip
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chiasm.data.images import load_image
from chiasm.data.sample import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SOURCES = ("fashion-mnist", "digits", "folder", "synthetic")


@dataclass
class ImageSet:
    """Images (N, C, H, W) in [-1, 1], labels (N,), class names; captions for text-conditioned data."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    captions: list[str] = field(default_factory=list)
    scenes: list[dict] = field(default_factory=list)  # the synthetic world's truth, for the pixel checker

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None) -> ImageSet:
        """The first ``n`` items (all when None)."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.images[:n], self.labels[:n], self.classes, self.captions[:n], self.scenes[:n])


def _to_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(pixels).copy()).float() / 127.5 - 1
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format, gzipped): a magic number, the dimensions, then uint8 data."""
    if not path.is_file():
        raise DataError(f"Fashion-MNIST file not found: {path}; install it with `apt-get install -y "
                        "dataset-fashion-mnist` (scripts/setup.sh does it as root) or set data.root")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: holds {data.size} values, its header says {dims}")
    return data.reshape(dims)


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> ImageSet:
    """60,000 training or 10,000 test images, 28 x 28 grey."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return ImageSet(_to_unit(images), torch.from_numpy(labels.astype(np.int64)), list(FASHION_MNIST_CLASSES))


def load_digits(split: str) -> ImageSet:
    """scikit-learn's 1,797 digits, 8 x 8 grey (0-16 scaled to 0-255); the last 297 are the test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    pixels = np.round(d.images * (255 / 16)).astype(np.uint8)
    cut = slice(0, 1500) if split == "train" else slice(1500, None)
    labels = torch.from_numpy(d.target[cut].astype(np.int64))
    return ImageSet(_to_unit(pixels[cut]), labels, [str(i) for i in range(10)])


def load_folder(root: Path, split: str, size: int, channels: int, test_share: float = 0.1) -> ImageSet:
    """``root/CLASS/*.png``: one subfolder per class (sorted by name); every tenth image is held out.

    An image that cannot be read is an error naming the file, not a silent skip: a data set
    with holes trains a different model than the one asked for.
    """
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected {root}/CLASS/image.png)")
    keep_every = max(2, round(1 / test_share))
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for i, path in enumerate(files):
            if (i % keep_every == keep_every - 1) != (split == "test"):
                continue
            img = load_image(path, source=str(root)).convert("L" if channels == 1 else "RGB").resize((size, size))
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    if not images:
        raise DataError(f"{root}: no images for the {split} split (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return ImageSet(_to_unit(np.stack(images)), torch.tensor(labels), classes)


def load_synthetic(split: str, n: int, size: int, seed: int = 0) -> ImageSet:
    """Single-object scenes of chiasm's synthetic world, with the world's caption of each.

    The label is the colour index (what the recognition metric asks about); ``scenes`` keeps
    each object's shape, colour, size and cell so that a checker can score a generated image.
    """
    from chiasm.synthetic.world import COLOURS, Scene, SceneObject, render_scene

    rng = random.Random(f"{seed}-{split}")
    colours = list(COLOURS)
    images, labels, captions, scenes = [], [], [], []
    from chiasm.synthetic.world import CELLS, SHAPES, SIZES

    for _ in range(n):
        obj = SceneObject(shape=rng.choice(SHAPES), colour=rng.choice(colours), size=rng.choice(list(SIZES)),
                          cell=rng.choice(CELLS), dx=round(rng.uniform(-1, 1), 3), dy=round(rng.uniform(-1, 1), 3))
        scene = Scene([obj], background="white")
        images.append(np.asarray(render_scene(scene, size), dtype=np.uint8))
        labels.append(colours.index(obj.colour))
        captions.append(f"a {obj.size} {obj.colour} {obj.shape} in the {obj.cell}")
        scenes.append({"shape": obj.shape, "colour": obj.colour, "size": obj.size, "cell": obj.cell})
    return ImageSet(_to_unit(np.stack(images)), torch.tensor(labels), colours, captions, scenes)


def load_dataset(source: str, split: str, *, root: str | None = None, size: int = 32, channels: int = 1,
                 n: int | None = None, seed: int = 0) -> ImageSet:
    """The one entry point the trainer, the metrics and the CLI use; ``n`` caps the number of images."""
    if source == "fashion-mnist":
        data = load_fashion_mnist(split, Path(root) if root else FASHION_MNIST_DIR)
    elif source == "digits":
        data = load_digits(split)
    elif source == "folder":
        if not root:
            raise DataError("data.source = 'folder' needs data.root (a folder of class subfolders)")
        data = load_folder(Path(root), split, size, channels)
    elif source == "synthetic":
        data = load_synthetic(split, n or (4000 if split == "train" else 500), size, seed)
    else:
        raise DataError(f"unknown data source {source!r}; known: {', '.join(SOURCES)}")
    return data.subset(n)
