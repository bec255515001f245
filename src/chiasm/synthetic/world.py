"""A small deterministic world of coloured shapes for offline VLM training and evaluation.

Real caption and VQA data need downloads, licences and hours of training before a
bridge shows any signal. This world is generated in seconds, its answers are
known exactly, and every question can be answered from the pixels alone, so a
model that beats chance on it has verifiably learned to look at the image. Each
question type probes a different skill: colour and shape (attribute binding),
count, position (spatial layout) and existence (rejecting absent objects).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from chiasm.data.llava import save_llava
from chiasm.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from chiasm.synthetic.wordings import training_wording

SHAPES = ("circle", "square", "triangle")
# Far apart in RGB so that colour is never ambiguous, even after resizing.
COLOURS = {
    "red": (230, 25, 25),
    "green": (20, 160, 40),
    "blue": (25, 60, 230),
    "yellow": (245, 215, 0),
    "purple": (130, 40, 180),
    "orange": (255, 128, 0),
}
SIZES = {"small": 30, "large": 45}  # radius in pixels at 224 x 224
CELLS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (225, 225, 225)}
QUESTION_TYPES = ("colour", "shape", "count", "position", "existence")
WORLD_FORMAT = 3

_CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?", "Give a short description of the image.")
_CAPTION_TEMPLATES = ("{}.", "The image shows {}.", "In this picture there is {}.")


@dataclass
class SceneObject:
    """One shape. ``dx``/``dy`` in [-1, 1] are the jitter as a fraction of the room left in its cell."""

    shape: str
    colour: str
    size: str
    cell: str
    dx: float = 0.0
    dy: float = 0.0


@dataclass
class Scene:
    """Objects in distinct cells with distinct colours, so "the red object" always names one."""

    objects: list[SceneObject]
    background: str = "white"


@dataclass
class Question:
    """A question about one scene with its single short, normalised answer."""

    question_type: str
    text: str
    answer: str


@dataclass
class WorldFiles:
    """Where :func:`make_world` put things; the JSON files load with ``load_llava``."""

    root: Path
    image_dir: Path
    align: Path
    instruct: Path
    eval: Path


def sample_scene(rng: random.Random) -> Scene:
    """Draw a scene; the object count is uniform in 1..4 so count answers are balanced."""
    n = rng.randint(1, len(CELLS))
    cells = rng.sample(CELLS, n)
    colours = rng.sample(list(COLOURS), n)
    objects = [
        SceneObject(
            shape=rng.choice(SHAPES), colour=colour, size=rng.choice(list(SIZES)), cell=cell,
            dx=round(rng.uniform(-1, 1), 3), dy=round(rng.uniform(-1, 1), 3),
        )
        for cell, colour in zip(cells, colours, strict=False)
    ]
    objects.sort(key=lambda o: CELLS.index(o.cell))
    return Scene(objects=objects, background=rng.choice(list(BACKGROUNDS)))


def object_geometry(obj: SceneObject, image_size: int = 224) -> tuple[int, int, int]:
    """Centre x, centre y and radius in pixels; the jitter never pushes a shape out of its cell."""
    scale = image_size / 224
    radius = max(2, round(SIZES[obj.size] * scale))
    half = image_size / 2
    room = max(0, int(half / 2 - radius - 2 * scale))
    row, col = divmod(CELLS.index(obj.cell), 2)
    cx = round(col * half + half / 2 + obj.dx * room)
    cy = round(row * half + half / 2 + obj.dy * room)
    return cx, cy, radius


def scene_regions(scene: Scene, image_size: int = 224) -> list[dict[str, Any]]:
    """Each object as a grounded phrase ("small red circle") with its box in [0, 1] coordinates.

    Place names ("top left") are left out: a place is not a thing in the box, and grounding
    them on the same boxes made held-out VQA worse, the position answers included (the
    README's demo table has the runs).
    """
    regions = []
    for obj in scene.objects:
        cx, cy, r = object_geometry(obj, image_size)
        box = [round(v, 4) for v in (max(0.0, (cx - r) / image_size), max(0.0, (cy - r) / image_size),
                                      min(1.0, (cx + r + 1) / image_size), min(1.0, (cy + r + 1) / image_size))]
        regions.append({"phrase": f"{obj.size} {obj.colour} {obj.shape}", "box": box})
    return regions


def render_scene(scene: Scene, image_size: int = 224) -> Image.Image:
    """Draw the scene without anti-aliasing, so each object's centre pixel is exactly its colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = object_geometry(obj, image_size)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = round(r * 0.85)  # a square of the same "radius" looks much bigger than the circle
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:  # equilateral triangle, apex up, centroid at the centre
            w = r * 0.866
            draw.polygon([(cx, cy - r), (cx - w, cy + r / 2), (cx + w, cy + r / 2)], fill=fill)
    return image


def caption(scene: Scene, rng: random.Random) -> str:
    """One sentence listing every object (size, colour, shape, cell) in reading order."""
    parts = [f"a {o.size} {o.colour} {o.shape} in the {o.cell}" for o in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = rng.choice(_CAPTION_TEMPLATES).format(listed)
    return text[0].upper() + text[1:]


def make_question(
    scene: Scene,
    question_type: str,
    rng: random.Random,
    *,
    exists: bool | None = None,
    avoid: Collection[str] = (),
) -> Question:
    """A question of ``question_type`` that the image alone answers.

    ``exists`` fixes the answer of an existence question, so a caller can keep
    yes/no exactly balanced; if None it is a coin flip. ``avoid`` lists colours
    of objects already talked about in a conversation: other objects are asked
    about first, so later answers cannot simply be copied from earlier turns.
    """
    objects = scene.objects
    fresh = [o for o in objects if o.colour not in avoid] or objects
    obj = rng.choice(fresh)
    if question_type == "colour":
        unique = [o for o in fresh if sum(p.shape == o.shape for p in objects) == 1]
        if unique and rng.random() < 0.5:
            obj = rng.choice(unique)
            return Question("colour", f"What colour is the {obj.shape}?", obj.colour)
        return Question("colour", f"What colour is the object in the {obj.cell}?", obj.colour)
    if question_type == "shape":
        if rng.random() < 0.5:
            return Question("shape", f"What shape is the {obj.colour} object?", obj.shape)
        return Question("shape", f"What shape is the object in the {obj.cell}?", obj.shape)
    if question_type == "count":
        return Question("count", "How many objects are there?", str(len(objects)))
    if question_type == "position":
        return Question("position", f"Where is the {obj.colour} {obj.shape}?", obj.cell)
    if question_type == "existence":
        if exists is None:
            exists = rng.random() < 0.5
        if exists:
            colour, shape = obj.colour, obj.shape
        else:
            present = {(o.colour, o.shape) for o in objects}
            colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
        return Question("existence", f"Is there a {colour} {shape}?", "yes" if exists else "no")
    raise ValueError(f"unknown question type {question_type!r}; known: {', '.join(QUESTION_TYPES)}")


@dataclass
class _Balancer:
    """Picks question types (and yes/no) so that totals stay within one of each other."""

    rng: random.Random
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUESTION_TYPES, 0))
    yes_no: list[bool] = field(default_factory=list)

    def types(self, k: int) -> list[str]:
        chosen: list[str] = []
        for _ in range(k):
            fresh = [t for t in QUESTION_TYPES if t not in chosen[len(chosen) // 5 * 5:]]
            low = min(self.counts[t] for t in fresh)
            pick = self.rng.choice([t for t in fresh if self.counts[t] == low])
            self.counts[pick] += 1
            chosen.append(pick)
        return chosen

    def exists(self) -> bool:
        if not self.yes_no:
            self.yes_no = [True, False]
            self.rng.shuffle(self.yes_no)
        return self.yes_no.pop()


def _scene_meta(scene: Scene) -> dict[str, Any]:
    """The scene in the record's meta, so answers can be checked without the image."""
    objects = [{"shape": o.shape, "colour": o.colour, "size": o.size, "cell": o.cell, "dx": o.dx, "dy": o.dy}
               for o in scene.objects]
    return {"background": scene.background, "objects": objects}


def scene_from_meta(meta: dict[str, Any]) -> Scene:
    """Inverse of the ``scene`` meta entry written by :func:`make_world`."""
    return Scene([SceneObject(**o) for o in meta["objects"]], meta["background"])


def _signature(scene: Scene, image_size: int) -> tuple:
    """Everything that decides the pixels; equal signatures mean identical images."""
    parts = tuple((o.shape, o.colour, o.size, object_geometry(o, image_size)) for o in scene.objects)
    return scene.background, parts


def _prompt(question: str) -> str:
    return f"{IMAGE_PLACEHOLDER}\n{question}"


def make_world(
    out_dir: Path,
    *,
    n_train: int,
    n_eval: int,
    seed: int = 0,
    image_size: int = 224,
    turns_per_conversation: int = 4,
    existence_pairs: bool = False,
    train_wordings: bool = False,
) -> WorldFiles:
    """Write images and the align/instruct/eval LLaVA files; reuse them if already there.

    Scenes come from one RNG per image (seeded by seed, split and index), so the
    output is byte-identical for a seed. Eval scenes are redrawn whenever one
    would render identically to a training scene, so the eval split is truly held
    out. With ``existence_pairs`` every training conversation asks existence both ways,
    one "yes" and one "no" (the missing ones drawn from a separate RNG, so the other
    turns and the eval split stay as they are). With ``train_wordings`` each training
    question is asked in the template's words or in one of its training-only wordings
    (``chiasm.synthetic.paraphrase``), drawn from a separate RNG too; the held-out wordings
    stay unseen. ``world.json`` is written last: its presence with matching parameters
    means a complete world, and a half-written one is regenerated.
    """
    if n_train < 0 or n_eval < 0 or turns_per_conversation < 1 or image_size < 16:
        raise ValueError("need n_train, n_eval >= 0, turns_per_conversation >= 1 and image_size >= 16")
    root = Path(out_dir)
    files = WorldFiles(root, root / "images", root / "align.json", root / "instruct.json", root / "eval.json")
    params = {"format": WORLD_FORMAT, "n_train": n_train, "n_eval": n_eval, "seed": seed,
              "image_size": image_size, "turns_per_conversation": turns_per_conversation}
    if existence_pairs:  # only recorded when on, so worlds written before the option stay valid
        params["existence_pairs"] = True
    if train_wordings:
        params["train_wordings"] = True
    manifest = root / "world.json"
    if manifest.is_file():
        try:
            cached = json.loads(manifest.read_text("utf-8"))
        except ValueError:
            cached = None
        if cached == params and all(p.exists() for p in (files.image_dir, files.align, files.instruct, files.eval)):
            return files
        manifest.unlink()
        for split in ("train", "eval"):
            shutil.rmtree(files.image_dir / split, ignore_errors=True)

    train = [sample_scene(random.Random(f"chiasm-world:{seed}:train:{i}")) for i in range(n_train)]
    taken = {_signature(s, image_size) for s in train}
    held_out = []
    for i in range(n_eval):
        rng = random.Random(f"chiasm-world:{seed}:eval:{i}")
        scene = sample_scene(rng)
        while _signature(scene, image_size) in taken:
            scene = sample_scene(rng)
        held_out.append(scene)

    train_paths = _write_images(train, files.image_dir / "train", image_size)
    eval_paths = _write_images(held_out, files.image_dir / "eval", image_size)
    rng = random.Random(f"chiasm-world:{seed}:text")
    balancer = _Balancer(random.Random(f"chiasm-world:{seed}:balance"))
    pair_rng = random.Random(f"chiasm-world:{seed}:pairs")
    word_rng = random.Random(f"chiasm-world:{seed}:wordings")
    align, instruct = [], []
    for i, (scene, path) in enumerate(zip(train, train_paths, strict=False)):
        conv = [Turn("human", _prompt(rng.choice(_CAPTION_PROMPTS))), Turn("gpt", caption(scene, rng))]
        align.append(Sample(f"align-{i:05d}", conv, [path],
                            {"scene": _scene_meta(scene), "regions": scene_regions(scene, image_size)}))
        questions = _questions(scene, balancer.types(turns_per_conversation), rng, balancer)
        if existence_pairs:
            questions = _with_opposite_existence(scene, questions, pair_rng)
        if train_wordings:
            questions = [Question(q.question_type, training_wording(q.text, word_rng), q.answer) for q in questions]
        conv = []
        for j, q in enumerate(questions):
            conv += [Turn("human", _prompt(q.text) if j == 0 else q.text), Turn("gpt", q.answer)]
        meta = {"question_types": [q.question_type for q in questions], "scene": _scene_meta(scene)}
        instruct.append(Sample(f"instruct-{i:05d}", conv, [path], meta))
    evaluation = []
    for i, (scene, path) in enumerate(zip(held_out, eval_paths, strict=False)):
        for q in _questions(scene, list(QUESTION_TYPES), rng, balancer):
            meta = {"question_type": q.question_type, "answer": q.answer, "scene": _scene_meta(scene)}
            conv = [Turn("human", _prompt(q.text)), Turn("gpt", q.answer)]
            evaluation.append(Sample(f"eval-{i:05d}-{q.question_type}", conv, [path], meta))

    save_llava(align, files.align, root)
    save_llava(instruct, files.instruct, root)
    save_llava(evaluation, files.eval, root)
    manifest.write_text(json.dumps(params, indent=1) + "\n", "utf-8")
    return files


def _questions(scene: Scene, types: list[str], rng: random.Random, balancer: _Balancer) -> list[Question]:
    """One question per type, never asking the same text twice in a conversation."""
    questions: list[Question] = []
    mentioned: set[str] = set()
    for qtype in types:
        exists = balancer.exists() if qtype == "existence" else None
        q = _new_question(scene, qtype, rng, questions, exists=exists, avoid=mentioned)
        questions.append(q)
        mentioned |= _colours_named(scene, q)
    return questions


def _new_question(scene: Scene, qtype: str, rng: random.Random, asked: list[Question], *,
                  exists: bool | None, avoid: Collection[str]) -> Question:
    """A question of ``qtype`` whose text ``asked`` does not hold yet (10 draws, then the last one)."""
    for _ in range(10):
        q = make_question(scene, qtype, rng, exists=exists, avoid=avoid)
        if all(q.text != other.text for other in asked):
            break
    return q


def _colours_named(scene: Scene, question: Question) -> set[str]:
    """Colours of the scene's objects that a question or its answer talks about."""
    return {o.colour for o in scene.objects if o.colour in question.text or o.colour == question.answer}


def _with_opposite_existence(scene: Scene, questions: list[Question], rng: random.Random) -> list[Question]:
    """Add existence questions at random turns until the conversation asks one "yes" and one "no".

    A "yes" and a "no" about the same picture cannot both be met by a prior on the answer
    or on the wording: only comparing the named object with the image answers both, whereas
    one existence question per conversation can be met by a prior on the answer.
    """
    questions = list(questions)
    answers = {q.answer for q in questions if q.question_type == "existence"}
    for exists in (True, False):
        if ("yes" if exists else "no") in answers:
            continue
        at = rng.randint(0, len(questions))
        # As in _questions: a "yes" names an object that the earlier turns have not talked about.
        mentioned = set().union(*(_colours_named(scene, q) for q in questions[:at]))
        questions.insert(at, _new_question(scene, "existence", rng, questions, exists=exists, avoid=mentioned))
    return questions


def _write_images(scenes: list[Scene], folder: Path, image_size: int) -> list[Path]:
    """Render and save in threads: PNG encoding releases the GIL and dominates the cost."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(len(scenes))]

    def write(i: int) -> None:
        render_scene(scenes[i], image_size).save(paths[i], compress_level=1)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(len(scenes))))
    return paths
