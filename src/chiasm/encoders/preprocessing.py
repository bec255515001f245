"""How an image becomes the pixels an encoder was trained on: pad, resize, crop, rescale, normalise.

An encoder's weights only mean something for the preprocessing they were trained with: a CLIP
tower fed ImageNet statistics, or a DINOv2 tower fed a squashed image instead of a centre crop,
sees inputs it never saw in training. So the preprocessing is read from where the weights
come from (a transformers tower's ``preprocessor_config.json``, or the encoder's own
constants), written into every saved model folder, and never guessed.

The steps follow transformers' PIL image processors (resize of the 8-bit image with PIL,
centre crop, rescale, normalise), so chiasm's pixels equal those of the tower's own
processor. ``pad_to_square`` is LLaVA-1.5's: the image is first padded to a square with the
mean colour, so the whole picture survives a square resize or a centre crop undistorted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
            "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
# Named normalisations for towers whose folder carries no preprocessing config.
NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
ResizeMode = Literal["exact", "shortest_edge", "none"]


@dataclass
class ImagePreprocessing:
    """One image -> a normalised ``(3, H, W)`` float tensor.

    ``resize``: ``exact`` resizes to ``size`` = (height, width); ``shortest_edge`` scales the
    shorter side to ``size[0]`` keeping the aspect ratio (then ``crop`` cuts the centre);
    ``none`` keeps the image as it is. ``rescale`` multiplies the 8-bit values (1/255 maps
    them to [0, 1]); ``mean``/``std`` normalise per channel.
    """

    size: tuple[int, ...] = (224, 224)
    resize: ResizeMode = "exact"
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"
    rescale: float = 1 / 255
    pad_to_square: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # provenance only (e.g. the source processor type)

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)
        self.crop = None if self.crop is None else (int(self.crop[0]), int(self.crop[1]))
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.resample not in RESAMPLE:
            raise ValueError(f"unknown resample {self.resample!r}; known: {', '.join(RESAMPLE)}")
        if self.resize not in ("exact", "shortest_edge", "none"):
            raise ValueError(f"unknown resize mode {self.resize!r}; known: exact, shortest_edge, none")
        if self.resize == "exact" and len(self.size) != 2:
            raise ValueError(f"resize 'exact' needs size = [height, width], got {list(self.size)}")
        if self.resize == "shortest_edge" and len(self.size) != 1:
            raise ValueError(f"resize 'shortest_edge' needs size = [edge], got {list(self.size)}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need three values each (std > 0), got {self.mean}, {self.std}")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the image."""
        if self.crop is not None:
            return self.crop
        return (self.size[0], self.size[1]) if self.resize == "exact" else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.pad_to_square:
            image = pad_to_square(image, tuple(int(m * 255) for m in self.mean))
        if self.resize == "exact":
            image = image.resize((self.size[1], self.size[0]), RESAMPLE[self.resample])
        elif self.resize == "shortest_edge":
            w, h = image.size
            edge = self.size[0]
            short, long = min(w, h), max(w, h)
            new_short, new_long = edge, int(edge * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            image = image.resize((new_w, new_h), RESAMPLE[self.resample])
        arr = np.asarray(image)
        if self.crop is not None:
            arr = _centre_crop(arr, self.crop)
        x = torch.from_numpy((arr.astype(np.float64) * self.rescale).astype(np.float32)).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImagePreprocessing:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"image preprocessing: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def resized_to(self, side: int) -> ImagePreprocessing:
        """The same steps scaled so that the output is ``side`` x ``side`` (a tower run at another size)."""
        out = ImagePreprocessing(**{**asdict(self)})
        if self.crop is not None and self.resize == "shortest_edge":
            out.size = (max(side, round(self.size[0] * side / self.crop[0])),)
            out.crop = (side, side)
        else:
            out.resize, out.size, out.crop = "exact", (side, side), None
        return out


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """The image centred on a square canvas of its longer side, filled with ``fill``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _centre_crop(arr: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    ch, cw = crop
    h, w = arr.shape[:2]
    if ch > h or cw > w:
        raise ValueError(f"centre crop {ch} x {cw} is larger than the resized image {h} x {w}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return arr[top : top + ch, left : left + cw]


def from_image_processor(proc: Any, *, fixed: tuple[int, int] | None = None) -> ImagePreprocessing:
    """Translate a transformers image processor (CLIP, SigLIP, ViT, BiT/DINOv2 style) into chiasm's steps.

    ``fixed`` = (height, width) replaces the processor's resize by an exact one, for processors
    that choose the size per image (SigLIP2's NaFlex), which chiasm runs at one size.
    """
    size = proc.size if getattr(proc, "do_resize", True) else None
    if fixed is not None:
        resize, dims = "exact", fixed
    elif size is None:
        resize, dims = "none", (0,)
    elif _get(size, "height") and _get(size, "width"):
        resize, dims = "exact", (_get(size, "height"), _get(size, "width"))
    elif _get(size, "shortest_edge") and not _get(size, "longest_edge"):
        resize, dims = "shortest_edge", (_get(size, "shortest_edge"),)
    else:
        raise ValueError(f"unsupported image processor size {dict(size)!r}: chiasm reads height/width or "
                         "shortest_edge")
    crop = None
    if getattr(proc, "do_center_crop", False) and fixed is None:
        cs = proc.crop_size
        crop = (_get(cs, "height"), _get(cs, "width"))
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if getattr(proc, "do_normalize", True):
        mean, std = _triple(proc.image_mean), _triple(proc.image_std)
    rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 1.0
    resample = proc.resample if proc.resample is not None else Image.Resampling.BILINEAR
    name = Image.Resampling(int(resample)).name.lower()
    if getattr(proc, "do_pad", False):
        raise ValueError(f"{type(proc).__name__} pads batches (do_pad); chiasm needs one fixed image size")
    return ImagePreprocessing(size=dims, resize=resize, crop=crop, mean=mean, std=std, resample=name,
                              rescale=rescale, extra={"from": type(proc).__name__})


def _get(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _triple(values: Any) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    return tuple(float(v) for v in values)  # type: ignore[return-value]
