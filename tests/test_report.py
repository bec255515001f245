"""The run report must render from any subset of a run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from chiasm.report import write_report
from chiasm.report.html import fmt_seconds
from chiasm.report.plots import ema, plot_accuracy, read_metrics, stage_names

DATA_URI = "data:image/png;base64,"


def _write_metrics(run: Path, stage: str, n: int, start_loss: float) -> None:
    folder = run / "stages" / stage
    folder.mkdir(parents=True)
    lines = []
    for step in range(n):
        record = {
            "stage": stage, "step": step, "loss": start_loss * math.exp(-step / 20),
            "lr": 1e-3 * min(1.0, (step + 1) / 5), "tokens_per_s": 1000.0,
            "images_per_s": 8.0, "epoch": step / n, "time_s": 0.5 * step,
        }
        lines.append(json.dumps(record))
    # A crashed writer leaves a truncated last line; it must be skipped, not fatal.
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9', "utf-8")


def _eval() -> dict:
    return {
        "model": "tiny-vlm",
        "vqa": {"overall": 0.6321, "per_type": {"color": 0.75, "count": 0.5}, "n": 40},
        "blank": {"overall": 0.3125, "per_type": {"color": 0.4, "count": 0.25}, "n": 40},
        "chance": {"overall": 0.2, "per_type": {"color": 0.125, "count": 0.25}},
        "reliance": {"collapsed": False, "message": "accuracy drops without the image"},
        "retention": {
            "base_ppl": 12.3456, "model_ppl": 12.8, "ppl_ratio": 1.0368,
            "unchanged_share": 0.82, "n_prompts": 20, "n_tokens": 640,
        },
        "stage_retention": {"align": {"model_ppl": 12.4, "ppl_ratio": 1.0044}},
        "samples": [
            {"image": "samples/a.png", "question": "What is <b>this</b> & that?",
             "answer": "red", "truth": "red", "correct": True, "question_type": "color"},
            {"image": "samples/b.png", "question": "How many?", "answer": "2",
             "truth": "3", "correct": False, "question_type": "count"},
        ],
        "timings": {"eval": 75.0, "train": 7500.0},
    }


def _fake_run(tmp_path: Path, *, metrics: bool = True, evaluation: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    if metrics:
        _write_metrics(run, "instruct", 60, 3.0)
        _write_metrics(run, "align", 40, 6.0)
        (run / "stages.json").write_text(json.dumps(["align", "instruct"]), "utf-8")
    if evaluation:
        (run / "samples").mkdir()
        Image.new("RGB", (320, 240), (200, 30, 30)).save(run / "samples" / "a.png")
        Image.new("RGB", (64, 64), (30, 200, 30)).save(run / "samples" / "b.png")
        (run / "eval.json").write_text(json.dumps(_eval()), "utf-8")
    return run


def _assert_png(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 0


def test_full_report(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    out = write_report(run, title="demo <run>")
    assert out == run / "report.html" and out.is_file()
    html = out.read_text("utf-8")

    assert "<title>demo &lt;run&gt;</title>" in html
    for text in ("63.2%", "31.2%", "20.0%", "(n=40)", "75.0%", "12.35 → 12.80",
                 "1.037×", "82.0%", "20 prompts", "1.004×", "1 min 15 s", "2 h 05 min",
                 "+32.0 pt", "+35.0 pt", "tiny-vlm"):
        assert text in html, text
    assert "What is &lt;b&gt;this&lt;/b&gt; &amp; that?" in html
    assert "<b>this</b>" not in html
    assert 'class="good">uses the image' in html
    assert "accuracy drops without the image" in html
    # loss + accuracy plots + two sample thumbnails
    assert html.count(DATA_URI) == 4
    assert 'class="card ok"' in html and 'class="card wrong"' in html
    assert html.index(">align<") < html.index(">instruct<")
    for name in ("loss.png", "accuracy.png"):
        _assert_png(run / name)


def test_collapsed_verdict_is_red(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, metrics=False)
    data = json.loads((run / "eval.json").read_text("utf-8"))
    data["reliance"] = {"collapsed": True, "message": "same answers <blank>"}
    (run / "eval.json").write_text(json.dumps(data), "utf-8")
    html = write_report(run).read_text("utf-8")
    assert 'class="bad">collapsed' in html
    assert "same answers &lt;blank&gt;" in html


def test_without_eval(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, evaluation=False)
    html = write_report(run).read_text("utf-8")
    assert html.count(DATA_URI) == 1
    assert "No eval.json" in html
    _assert_png(run / "loss.png")
    assert not (run / "accuracy.png").exists()


def test_without_metrics(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, metrics=False)
    html = write_report(run).read_text("utf-8")
    assert "No training metrics" in html
    assert "63.2%" in html
    assert html.count(DATA_URI) == 3
    assert not (run / "loss.png").exists()
    _assert_png(run / "accuracy.png")


def test_empty_run_and_missing_sample_image(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    assert "No eval.json" in write_report(empty).read_text("utf-8")

    run = _fake_run(tmp_path, metrics=False)
    (run / "samples" / "b.png").unlink()
    html = write_report(run).read_text("utf-8")
    assert "no image" in html
    assert html.count(DATA_URI) == 2


def test_helpers(tmp_path: Path) -> None:
    assert read_metrics(tmp_path / "missing.jsonl") == []
    assert stage_names(tmp_path) == []
    smoothed = ema([2.0, float("nan"), 2.0], span=3)
    assert smoothed == [2.0, 2.0, 2.0]
    assert fmt_seconds(12.34) == "12.3 s" and fmt_seconds(None) == "—"
    assert plot_accuracy({"model": "x"}, tmp_path / "a.png") is None


def test_contrastive_stage_gets_its_own_panel(tmp_path: Path) -> None:
    from chiasm.report.plots import plot_loss_curves

    run = tmp_path / "run"
    folder = run / "stages" / "prealign"
    folder.mkdir(parents=True)
    records = [{"stage": "prealign", "step": s + 1, "loss": 4.0 - s / 300, "lr": 1e-3, "retrieval_acc": s / 1000}
               for s in range(900)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    (run / "stages.json").write_text(json.dumps(["prealign"]), "utf-8")
    alone = plot_loss_curves(run, tmp_path / "alone.png")
    _write_metrics(run, "align", 40, 6.0)
    (run / "stages.json").write_text(json.dumps(["prealign", "align"]), "utf-8")
    both = plot_loss_curves(run, tmp_path / "both.png")
    # Two panels side by side make a wider figure than the one-panel plot of the same height.
    with Image.open(alone) as a, Image.open(both) as b:
        assert b.size[1] == a.size[1] and b.size[0] > 1.2 * a.size[0]
