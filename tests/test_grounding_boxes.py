"""Grounding: the box text convention, strict data checks, IoU scoring, drawing, the GUI world."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from chiasm.data.llava import load_llava
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.eval.scorers import get_scorer
from chiasm.eval.vqa import score
from chiasm.grounding.boxes import BoxFormat, check_box, iou
from chiasm.grounding.draw import draw_prediction
from chiasm.grounding.scorer import grounding_summary
from chiasm.synthetic.gui import make_gui_world


@pytest.mark.parametrize("style", ["int1000", "fraction"])
def test_box_text_round_trips(style: str) -> None:
    fmt = BoxFormat(style)  # type: ignore[arg-type]
    rng = random.Random(0)
    for _ in range(100):
        w, h = rng.randint(50, 2000), rng.randint(50, 2000)
        x0, y0 = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
        box = (x0, y0, rng.uniform(x0 + 5, w), rng.uniform(y0 + 5, h))
        text = fmt.to_text(box, (w, h))
        back = fmt.parse(f"It is at {text}.", (w, h))
        tol = (w / 1000, h / 1000) if style == "int1000" else (w / 200, h / 200)
        assert all(abs(a - b) <= tol[i % 2] + 1e-9 for i, (a, b) in enumerate(zip(back, box, strict=True)))
    assert BoxFormat().to_text((0, 0, 640, 400), (640, 400)) == "<box>(0,0),(999,999)</box>"  # [0, 1000)
    assert BoxFormat().parse("no box here", (10, 10)) is None


def test_iou_matches_counting_pixels() -> None:
    import numpy as np

    rng = random.Random(2)
    for _ in range(50):
        a, b = ([rng.randint(0, 20), rng.randint(0, 20)] for _ in range(2))
        a += [a[0] + rng.randint(1, 20), a[1] + rng.randint(1, 20)]
        b += [b[0] + rng.randint(1, 20), b[1] + rng.randint(1, 20)]
        ma, mb = np.zeros((50, 50), bool), np.zeros((50, 50), bool)
        ma[a[1]:a[3], a[0]:a[2]] = True
        mb[b[1]:b[3], b[0]:b[2]] = True
        assert iou(tuple(a), tuple(b)) == pytest.approx((ma & mb).sum() / (ma | mb).sum())
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


def test_bad_boxes_name_the_sample() -> None:
    with pytest.raises(DataError, match=r"sample 's9'.*x1 < x0"):
        check_box([50, 10, 20, 30], (100, 100), source="d.json", sample_id="s9")
    with pytest.raises(DataError, match=r"file d.json.*outside the 100 x 100 image"):
        check_box([50, 10, 120, 30], (100, 100), source="d.json", sample_id="s9")


def test_iou_scorer_gives_acc_and_mean_iou_and_draws(tmp_path: Path) -> None:
    files = make_gui_world(tmp_path / "gui", n_train=2, n_eval=3, seed=0)
    samples = load_llava(files["eval"]).samples
    clicks = [s for s in samples if s.meta["question_type"] == "click"]
    truths = [s.conversations[-1].text for s in clicks]
    shifted = ["<box>(0,0),(5,5)</box>", *truths[1:]]
    scorer = get_scorer("iou")
    assert [scorer.score(t, s) for s, t in zip(clicks, truths, strict=True)] == [1.0] * len(clicks)
    summary = grounding_summary(clicks, shifted)
    assert summary["acc_at_0_5"] == pytest.approx((len(clicks) - 1) / len(clicks)) and summary["mean_iou"] < 1
    mixed = score(samples, [s.conversations[-1].text for s in samples], "iou")  # read tasks by exact match
    assert mixed["overall"] == 1.0
    out = draw_prediction(clicks[0], shifted[0], tmp_path / "drawn.png")
    x0, y0, _, _ = clicks[0].meta["box"]
    assert Image.open(out).getpixel((int(x0) + 1, int(y0) + 10))[1] > 150  # the green reference outline


def test_gui_world_is_held_out_and_boxes_lie_on_buttons(tmp_path: Path) -> None:
    files = make_gui_world(tmp_path / "gui", n_train=3, n_eval=2, seed=0, box_style="fraction")
    train, held = load_llava(files["train"]).samples, load_llava(files["eval"]).samples
    pixels = {Image.open(s.images[0]).tobytes() for s in train}
    assert not any(Image.open(s.images[0]).tobytes() in pixels for s in held)
    for s in train:
        if "box" in s.meta:
            box = check_box(s.meta["box"], tuple(s.meta["image_size"]), sample_id=s.id)
            parsed = BoxFormat("fraction").parse(s.conversations[-1].text, tuple(s.meta["image_size"]))
            assert iou(parsed, box) > 0.9
    read = next(s for s in train if s.meta["question_type"] == "read")
    assert read.meta["answer"] in {"Submit", "Cancel", "OK", "Save", "Delete", "Next", "Back", "Apply", "Login",
                                   "Help"}
    assert isinstance(read, Sample) and isinstance(read.conversations[0], Turn)
