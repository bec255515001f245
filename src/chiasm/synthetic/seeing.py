"""Synthetic worlds that need high resolution, several images or video frames.

- ``small_objects``: one small shape (about 1/60 of the side) among grey specks on a large
  image; "What shape is the small red object?". A single 224-pixel view leaves it a few
  pixels wide; tiles keep it whole.
- ``which_image``: two or three images of one shape each; "Which image has the blue
  circle? Answer first, second or third." Its training images also go, one at a time with
  their caption ("a blue circle"), into ``captions.json``: the alignment data of a first
  stage (LLaVA's recipe), so that the bridge has learnt to say what each image holds before
  the LM learns to match the question against several of them.
- ``what_changed``: a four-frame clip (a folder of frames, read as a video with time
  markers, :mod:`chiasm.data.video`) where one thing happens between frame 1 and frame 4:
  an object moves, appears, disappears or changes colour.

Every world writes ``train.json`` and a held-out ``eval.json`` (LLaVA format; held-out
scenes come from other seeds) and images under ``images/``.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from chiasm.data.llava import save_llava
from chiasm.data.sample import Sample, Turn
from chiasm.data.video import video_turn_text

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
ORDINALS = ("first", "second", "third")
CHANGES = ("moved", "appeared", "disappeared", "changed colour")


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """A filled circle, square or triangle of radius ``r`` centred on (cx, cy)."""
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _small_objects(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    img = Image.new("RGB", (size, size), (245, 245, 240))
    pen = ImageDraw.Draw(img)
    for _ in range(40):  # specks: the object is not the only thing on the page
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        pen.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(150, 150, 150))
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    r = size / 120
    draw_shape(pen, shape, rng.uniform(2 * r, size - 2 * r), rng.uniform(2 * r, size - 2 * r), r, COLOURS[colour])
    return img, shape, colour


def _one_shape(rng: random.Random, size: int, shape: str, colour: str) -> tuple[Image.Image, list[float]]:
    """An image of one shape and the shape's box as fractions of the side."""
    img = Image.new("RGB", (size, size), (250, 250, 250))
    r = size / 6
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
    return img, [round((cx - r) / size, 4), round((cy - r) / size, 4), round((cx + r) / size, 4),
                 round((cy + r) / size, 4)]


def _world_samples(kind: str, n: int, split: str, seed: int, root: Path, size: int,
                   captions: list[Sample] | None = None) -> list[Sample]:
    """``n`` samples of world ``kind``; ``captions`` (which_image) receives each image alone with its caption."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = random.Random(f"{kind}-{seed}-{split}-{i}")
        sid = f"{kind}-{split}-{i}"
        if kind == "small_objects":
            img, shape, colour = _small_objects(rng, size)
            path = folder / f"{sid}.png"
            img.save(path, compress_level=1)
            out.append(Sample(sid, [Turn("human", f"<image>\nWhat shape is the small {colour} object?"),
                                    Turn("gpt", shape)], [path], {"question_type": "small_shape"}))
        elif kind == "which_image":
            k = rng.choice((2, 3))
            pairs = rng.sample([(s, c) for s in SHAPES for c in COLOURS], k)
            paths = []
            for j, (shape, colour) in enumerate(pairs):
                paths.append(folder / f"{sid}-{j}.png")
                img, box = _one_shape(rng, size, shape, colour)
                img.save(paths[-1], compress_level=1)
                if captions is not None:  # grounded: the phrase and its box, for region-level objectives
                    captions.append(Sample(f"{sid}-{j}", [Turn("human", "<image>\nWhat is in the image?"),
                                                           Turn("gpt", f"a {colour} {shape}")], [paths[-1]],
                                           {"question_type": "caption",
                                            "regions": [{"phrase": f"{colour} {shape}", "box": box}]}))
            pick = rng.randrange(k)
            shape, colour = pairs[pick]
            refs = " ".join(f"Image {j + 1}: <image>" for j in range(k))
            out.append(Sample(sid, [Turn("human", f"{refs}\nWhich image has the {colour} {shape}? Answer "
                                                  f"{', '.join(ORDINALS[:k - 1])} or {ORDINALS[k - 1]}."),
                                    Turn("gpt", ORDINALS[pick])], [*paths], {"question_type": f"which_of_{k}"}))
        else:
            out.append(_clip_sample(rng, sid, folder / sid, size))
    return out


def _clip_sample(rng: random.Random, sid: str, clip: Path, size: int) -> Sample:
    """Four frames: two objects, one of which changes (by ``CHANGES``) between frame 1 and frame 4."""
    clip.mkdir(parents=True, exist_ok=True)
    (s1, c1), (s2, c2) = rng.sample([(s, c) for s in SHAPES for c in COLOURS], 2)
    r = size / 8
    p1 = (rng.uniform(r, size / 2 - r), rng.uniform(r, size - r))
    p2 = (rng.uniform(size / 2 + r, size - r), rng.uniform(r, size - r))
    change = rng.choice(CHANGES)
    new_colour = rng.choice([c for c in COLOURS if c not in (c1, c2)])
    target = rng.choice((s1, s2)) if change != "appeared" else s2
    for f in range(4):
        img = Image.new("RGB", (size, size), (250, 250, 250))
        pen = ImageDraw.Draw(img)
        t = f / 3
        for shape, colour, (x, y) in ((s1, c1, p1), (s2, c2, p2)):
            if shape == target:
                if change == "moved":
                    y = y + (size - 2 * r - y) * t if y < size / 2 else y - (y - r) * t
                elif (change == "appeared" and f == 0) or (change == "disappeared" and f == 3):
                    continue
                elif change == "changed colour" and f == 3:
                    colour = new_colour
            draw_shape(pen, shape, x, y, r, COLOURS[colour])
        img.save(clip / f"frame-{f + 1}.png", compress_level=1)
    frames = sorted(clip.glob("frame-*.png"))
    question = f"{video_turn_text(len(frames), fps=1.0)}\nWhat changed between frame 1 and frame 4?"
    return Sample(sid, [Turn("human", question), Turn("gpt", f"the {target} {change}")], frames,
                  {"question_type": change.replace(" ", "_")})


def make_seeing_world(kind: str, out_dir: Path, *, n_train: int, n_eval: int, seed: int = 0,
                      image_size: int | None = None) -> dict[str, Path]:
    """Write ``train.json`` and held-out ``eval.json`` of world ``kind`` (see the module docstring);
    which_image also ``captions.json``, its training images one at a time with their captions."""
    if kind not in ("small_objects", "which_image", "what_changed"):
        raise ValueError(f"unknown world {kind!r}; known: small_objects, which_image, what_changed, gui")
    size = image_size or (672 if kind == "small_objects" else 128)
    root = Path(out_dir)
    files = {}
    captions: list[Sample] | None = [] if kind == "which_image" else None
    for split, n in (("train", n_train), ("eval", n_eval)):
        files[split] = root / f"{split}.json"
        save_llava(_world_samples(kind, n, split, seed, root, size, captions if split == "train" else None),
                   files[split], root)
    if captions is not None:
        files["captions"] = root / "captions.json"
        save_llava(captions, files["captions"], root)
    return files
