"""A GUI world for grounding: screenshots of simple windows and forms, with box and text tasks.

Each screen is a window (title bar, a few labelled text fields, checkboxes and two or three
buttons in distinct colours), rendered with PIL and DejaVu Sans at a small size, so reading
a label needs the full resolution. Tasks:

- ``click``: "click on Submit" -> the button's box, as text in the configured box style
  (:mod:`chiasm.grounding.boxes`); scored by IoU (``scorer = "iou"``);
- ``read``: "what does the red button say?" -> its text; scored by exact match.

Screens are drawn from one RNG per split and index, so a seed gives the same files; the
held-out split uses its own seeds, and its screens' layouts differ from training's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from chiasm.data.llava import save_llava
from chiasm.data.sample import Sample, Turn
from chiasm.grounding.boxes import BoxFormat
from chiasm.synthetic.fonts import font

BUTTON_WORDS = ["Submit", "Cancel", "OK", "Save", "Delete", "Next", "Back", "Apply", "Login", "Help"]
BUTTON_COLOURS = {"red": (200, 40, 40), "green": (40, 150, 60), "blue": (40, 80, 200), "orange": (230, 130, 20),
                  "purple": (120, 60, 170)}
FIELD_LABELS = ["Name", "Email", "City", "Phone", "User", "Code", "Street", "Age"]
CHECK_LABELS = ["Remember me", "Subscribe", "Agree to terms", "Dark mode", "Notify me"]


@dataclass
class Widget:
    kind: str  # button, field, checkbox, label
    text: str
    box: tuple[int, int, int, int]
    colour: str | None = None


def render_screen(rng: random.Random, size: tuple[int, int] = (640, 400)) -> tuple[Image.Image, list[Widget]]:
    """One window screenshot and its widgets (pixel boxes)."""
    w, h = size
    img = Image.new("RGB", size, (236, 236, 236))
    pen = ImageDraw.Draw(img)
    small, title_font = font(12), font(14)
    pen.rectangle([0, 0, w, 26], fill=(60, 70, 90))
    pen.text((10, 5), rng.choice(["Settings", "Sign up", "Profile", "Order form", "Account"]), fill="white",
             font=title_font)
    widgets: list[Widget] = []
    y = 40 + rng.randint(0, 20)
    x0 = 20 + rng.randint(0, 60)
    for label in rng.sample(FIELD_LABELS, rng.randint(2, 4)):
        pen.text((x0, y + 4), label + ":", fill=(20, 20, 20), font=small)
        box = (x0 + 70, y, x0 + 70 + rng.randint(140, 260), y + 22)
        pen.rectangle(box, fill="white", outline=(120, 120, 120))
        widgets.append(Widget("field", label, box))
        y += 34 + rng.randint(0, 10)
    for label in rng.sample(CHECK_LABELS, rng.randint(1, 2)):
        box = (x0, y, x0 + 14, y + 14)
        pen.rectangle(box, fill="white", outline=(60, 60, 60))
        if rng.random() < 0.5:
            pen.line([box[0] + 3, box[1] + 7, box[0] + 6, box[3] - 3, box[2] - 2, box[1] + 2], fill="black", width=2)
        pen.text((x0 + 22, y), label, fill=(20, 20, 20), font=small)
        widgets.append(Widget("checkbox", label, box))
        y += 26
    words = rng.sample(BUTTON_WORDS, rng.randint(2, 3))
    colours = rng.sample(list(BUTTON_COLOURS), len(words))
    bx = x0 + rng.randint(0, 120)
    by = min(h - 40, y + 10 + rng.randint(0, 30))
    for word, colour in zip(words, colours, strict=True):
        tw = int(pen.textlength(word, font=small))
        box = (bx, by, bx + tw + 24, by + 26)
        pen.rounded_rectangle(box, radius=4, fill=BUTTON_COLOURS[colour])
        pen.text((bx + 12, by + 6), word, fill="white", font=small)
        widgets.append(Widget("button", word, box, colour))
        bx = box[2] + 16 + rng.randint(0, 30)
    return img, widgets


def gui_samples(n: int, split: str, seed: int, folder: Path, fmt: BoxFormat,
                size: tuple[int, int] = (640, 400)) -> list[Sample]:
    """``n`` screens of ``split`` saved under ``folder``, with one click and one read task each."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Sample] = []
    for i in range(n):
        rng = random.Random(f"gui-{seed}-{split}-{i}")
        img, widgets = render_screen(rng, size)
        path = folder / f"{split}-{i:05d}.png"
        img.save(path, compress_level=1)
        buttons = [wd for wd in widgets if wd.kind == "button"]
        target = rng.choice(buttons)
        meta = {"box": list(target.box), "image_size": list(size), "box_style": fmt.style, "question_type": "click"}
        out.append(Sample(f"gui-{split}-{i}-click", [Turn("human", f"<image>\nClick on {target.text}."),
                                                      Turn("gpt", fmt.to_text(target.box, size))], [path], meta))
        asked = rng.choice(buttons)
        out.append(Sample(f"gui-{split}-{i}-read",
                          [Turn("human", f"<image>\nWhat does the {asked.colour} button say?"),
                           Turn("gpt", asked.text)], [path], {"question_type": "read", "answer": asked.text}))
    return out


def make_gui_world(out_dir: Path, *, n_train: int, n_eval: int, seed: int = 0,
                   box_style: str = "int1000") -> dict[str, Path]:
    """Write ``train.json`` and the held-out ``eval.json`` (LLaVA format) with their screens."""
    root = Path(out_dir)
    fmt = BoxFormat(box_style)  # type: ignore[arg-type]
    files = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        files[split] = root / f"{split}.json"
        save_llava(gui_samples(n, split, seed, root / "images", fmt), files[split], root)
    return files
