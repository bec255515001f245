"""The synthetic world: deterministic, held out, balanced, and its answers are true."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chiasm.data.llava import load_llava
from chiasm.synthetic import world as synthetic
from chiasm.synthetic.answers import answer_matches
from chiasm.synthetic.world import (
    CELLS,
    COLOURS,
    QUESTION_TYPES,
    Scene,
    make_world,
    object_geometry,
    render_scene,
    sample_scene,
    scene_from_meta,
)

N_TRAIN, N_EVAL = 60, 30


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> synthetic.WorldFiles:
    return make_world(tmp_path_factory.mktemp("world"), n_train=N_TRAIN, n_eval=N_EVAL, seed=1, image_size=96)


def oracle(question: str, scene: Scene) -> str:
    """Answer a question from the scene alone, independently of the generator."""
    objs = scene.objects

    def one(**attrs: str) -> synthetic.SceneObject:
        found = [o for o in objs if all(getattr(o, k) == v for k, v in attrs.items())]
        assert len(found) == 1, f"{question!r} does not single out one object in {scene}"
        return found[0]

    rules = [
        (r"What colour is the (circle|square|triangle)\?", lambda m: one(shape=m[1]).colour),
        (r"What colour is the object in the (.+)\?", lambda m: one(cell=m[1]).colour),
        (r"What shape is the (\w+) object\?", lambda m: one(colour=m[1]).shape),
        (r"What shape is the object in the (.+)\?", lambda m: one(cell=m[1]).shape),
        (r"How many objects are there\?", lambda m: str(len(objs))),
        (r"Where is the (\w+) (\w+)\?", lambda m: one(colour=m[1], shape=m[2]).cell),
        (r"Is there a (\w+) (\w+)\?",
         lambda m: "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objs) else "no"),
    ]
    for pattern, answer in rules:
        if match := re.fullmatch(pattern, question):
            return answer(match)
    raise AssertionError(f"unexpected question {question!r}")


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = make_world(tmp_path / "a", n_train=12, n_eval=4, seed=5, image_size=64)
    b = make_world(tmp_path / "b", n_train=12, n_eval=4, seed=5, image_size=64)
    c = make_world(tmp_path / "c", n_train=12, n_eval=4, seed=6, image_size=64)
    assert _digest(a.root) == _digest(b.root)
    assert a.instruct.read_bytes() != c.instruct.read_bytes()
    assert _digest(a.image_dir) != _digest(c.image_dir)


def test_files_load_and_have_expected_shape(world: synthetic.WorldFiles) -> None:
    align = load_llava(world.align).samples
    instruct = load_llava(world.instruct).samples
    evaluation = load_llava(world.eval).samples
    assert len(align) == len(instruct) == N_TRAIN
    assert len(evaluation) == N_EVAL * len(QUESTION_TYPES)
    for sample in align:
        scene = scene_from_meta(sample.meta["scene"])
        text = sample.conversations[1].text
        assert sample.conversations[0].text.startswith("<image>\n")
        assert all(f"{o.size} {o.colour} {o.shape} in the {o.cell}" in text for o in scene.objects)
    for sample in instruct:
        turns = sample.conversations
        assert len(turns) == 8 and turns[0].text.startswith("<image>\n")
        assert all("<image>" not in t.text for t in turns[1:])
        assert len(sample.meta["question_types"]) == 4


def test_eval_is_held_out(world: synthetic.WorldFiles) -> None:
    train = {p for s in load_llava(world.instruct).samples for p in s.images}
    held_out = {p for s in load_llava(world.eval).samples for p in s.images}
    assert len(held_out) == N_EVAL and not train & held_out
    assert all(p.parent.name == "eval" for p in held_out)
    pixels = {Image.open(p).tobytes() for p in train}
    assert not pixels & {Image.open(p).tobytes() for p in held_out}


def test_meta_scene_matches_the_pixels(world: synthetic.WorldFiles) -> None:
    for sample in load_llava(world.eval).samples[::5]:
        scene = scene_from_meta(sample.meta["scene"])
        assert render_scene(scene, 96).tobytes() == Image.open(sample.images[0]).convert("RGB").tobytes()


def test_every_answer_is_true_of_the_scene(world: synthetic.WorldFiles) -> None:
    for sample in load_llava(world.eval).samples:
        scene = scene_from_meta(sample.meta["scene"])
        question = sample.conversations[0].text.removeprefix("<image>\n")
        assert sample.meta["answer"] == sample.conversations[1].text == oracle(question, scene)
    for sample in load_llava(world.instruct).samples:
        scene = scene_from_meta(sample.meta["scene"])
        turns = sample.conversations
        for human, gpt in zip(turns[::2], turns[1::2], strict=False):
            assert gpt.text == oracle(human.text.removeprefix("<image>\n"), scene)


def test_question_types_and_yes_no_are_balanced(world: synthetic.WorldFiles) -> None:
    types = Counter(t for s in load_llava(world.instruct).samples for t in s.meta["question_types"])
    assert set(types) == set(QUESTION_TYPES)
    assert max(types.values()) - min(types.values()) <= 1
    evaluation = load_llava(world.eval).samples
    assert Counter(s.meta["question_type"] for s in evaluation) == dict.fromkeys(QUESTION_TYPES, N_EVAL)
    existence = Counter(s.meta["answer"] for s in evaluation if s.meta["question_type"] == "existence")
    assert abs(existence["yes"] - existence["no"]) <= 1


def test_scene_sampling_rules_and_uniform_counts() -> None:
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(2000)]
    for scene in scenes:
        assert 1 <= len(scene.objects) <= 4
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
    counts = Counter(len(s.objects) for s in scenes)
    assert all(abs(counts[n] - 500) < 80 for n in range(1, 5))


@pytest.mark.parametrize("size", [224, 64])
def test_object_centre_has_its_colour_and_stays_in_its_cell(size: int) -> None:
    rng = random.Random(size)
    for _ in range(50):
        scene = sample_scene(rng)
        image = render_scene(scene, size)
        assert image.size == (size, size)
        for obj in scene.objects:
            cx, cy, _ = object_geometry(obj, size)
            assert image.getpixel((cx, cy)) == COLOURS[obj.colour]
            row, col = divmod(CELLS.index(obj.cell), 2)
            half = size // 2
            painted = (np.asarray(image) == COLOURS[obj.colour]).all(axis=-1)
            painted[row * half:(row + 1) * half, col * half:(col + 1) * half] = False
            assert not painted.any(), f"{obj} spills out of its cell"


def test_cache_reuses_and_parameters_invalidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = make_world(tmp_path, n_train=4, n_eval=2, image_size=32)
    assert json.loads((tmp_path / "world.json").read_text())["n_train"] == 4
    before = _digest(tmp_path)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated a cached world")

    monkeypatch.setattr(synthetic, "render_scene", fail)
    assert make_world(tmp_path, n_train=4, n_eval=2, image_size=32) == files
    monkeypatch.undo()
    assert _digest(tmp_path) == before
    make_world(tmp_path, n_train=3, n_eval=2, image_size=32)
    assert len(load_llava(files.align).samples) == 3
    assert sorted(p.name for p in (files.image_dir / "train").iterdir()) == ["00000.png", "00001.png", "00002.png"]


def test_incomplete_world_is_regenerated(tmp_path: Path) -> None:
    files = make_world(tmp_path, n_train=3, n_eval=1, image_size=32)
    files.eval.unlink()
    make_world(tmp_path, n_train=3, n_eval=1, image_size=32)
    assert len(load_llava(files.eval).samples) == len(QUESTION_TYPES)


@pytest.mark.parametrize(("prediction", "answer", "expected"), [
    ("Red.", "red", True),
    ("  the  top   left ", "top left", True),
    ("Top-left!", "top left", True),
    ("A circle", "circle", True),
    ("three", "3", True),
    ("Four.", "4", True),
    ("Yes", "yes", True),
    ("red circle", "red", False),
    ("no", "yes", False),
    ("5", "4", False),
])
def test_answer_matches(prediction: str, answer: str, expected: bool) -> None:
    assert answer_matches(prediction, answer) is expected


def test_existence_pairs_ask_yes_and_no_and_change_nothing_else(tmp_path: Path,
                                                                world: synthetic.WorldFiles) -> None:
    paired = make_world(tmp_path, n_train=N_TRAIN, n_eval=N_EVAL, seed=1, image_size=96, existence_pairs=True)
    assert paired.eval.read_bytes() == world.eval.read_bytes()  # the held-out split is untouched
    plain = load_llava(world.instruct).samples
    for sample, before in zip(load_llava(paired.instruct).samples, plain, strict=True):
        scene = scene_from_meta(sample.meta["scene"])
        turns = sample.conversations
        pairs = [(h.text.removeprefix("<image>\n"), g.text) for h, g in zip(turns[::2], turns[1::2], strict=True)]
        assert all(answer == oracle(question, scene) for question, answer in pairs)
        assert sorted(a for q, a in pairs if q.startswith("Is there")) == ["no", "yes"]
        assert sample.meta["question_types"].count("existence") == 2
        assert len(pairs) == len(before.conversations) // 2 + 2 - before.meta["question_types"].count("existence")
        assert turns[0].text.startswith("<image>\n") and sum("<image>" in t.text for t in turns) == 1
        # Taking the added question out leaves the plain world's conversation.
        others = [p for p in pairs if not p[0].startswith("Is there")]
        plain_pairs = [(h.text.removeprefix("<image>\n"), g.text)
                       for h, g in zip(before.conversations[::2], before.conversations[1::2], strict=True)]
        assert others == [p for p in plain_pairs if not p[0].startswith("Is there")]
