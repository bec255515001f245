"""A single self-contained HTML page summarising one run folder.

Plots and sample thumbnails are embedded as base64 data URIs so the page can be
mailed, attached to an issue or copied off a cluster as one file. Every section
is optional: whatever part of the run exists is shown, and a missing part gets a
one-line note instead of an exception, so the report also works mid-training.
All text that comes from the run (questions, answers, stage names) is escaped.
"""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from chiasm.data.images import load_image
from chiasm.report.plots import (
    is_number,
    load_stages,
    plot_accuracy,
    plot_loss_curves,
    question_types,
    stage_names,
)
from chiasm.train.skips import SKIPPED_FILE, read_skips

THUMB_PX = 160
SKIP_REASONS = 3  # reasons quoted per stage; the full list is in the stage's skipped.jsonl
MISSING = "—"

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px;
       margin: 0 auto; padding: 1.5em; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta, .note { color: #666; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.good { color: #1a7f37; font-weight: 600; } .bad { color: #cf222e; font-weight: 600; }
img.plot { max-width: 100%; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr));
        gap: 0.8em; }
.card { border: 3px solid #ccc; border-radius: 6px; padding: 0.5em; font-size: 12px;
        overflow-wrap: anywhere; }
.card.ok { border-color: #2da44e; } .card.wrong { border-color: #cf222e; }
.card img, .card .noimg { display: block; margin: 0 auto 0.4em; max-width: 100%; }
.card .noimg { height: 80px; line-height: 80px; text-align: center; background: #f3f3f3;
               color: #888; }
.card p { margin: 0.2em 0; }
"""


# --- formatting -----------------------------------------------------------------

def fmt_pct(value: Any) -> str:
    """A [0, 1] fraction as a percentage with one decimal, e.g. ``63.2%``."""
    return f"{100 * value:.1f}%" if is_number(value) else MISSING


def fmt_num(value: Any, digits: int = 2) -> str:
    """A plain number with ``digits`` decimals, or a dash when absent."""
    return f"{value:.{digits}f}" if is_number(value) else MISSING


def fmt_ratio(value: Any) -> str:
    """A multiplicative ratio, e.g. ``1.037×``; three decimals because a few
    percent of perplexity drift is already worth noticing."""
    return f"{value:.3f}×" if is_number(value) else MISSING


def fmt_seconds(value: Any) -> str:
    """Durations readable at a glance: ``12.3 s``, ``4 min 05 s``, ``2 h 07 min``."""
    if not is_number(value):
        return MISSING
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# --- helpers ----------------------------------------------------------------------

def _load_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or ``None`` if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img_tag(png_path: Path | None, alt: str) -> str:
    if png_path is None:
        return ""
    uri = _data_uri(Path(png_path).read_bytes())
    return f'<img class="plot" src="{uri}" alt="{escape(alt)}">'


def _thumbnail(path: Path) -> str | None:
    """A downscaled PNG data URI, or ``None`` if the image cannot be read.

    Thumbnails keep a report with dozens of samples at a few hundred kilobytes
    instead of embedding every full-resolution source image.
    """
    try:
        # The training decoder: 16-bit scans, EXIF-rotated photos and CMYK look as the model saw them.
        img = load_image(path)
        img.thumbnail((THUMB_PX, THUMB_PX))
        buffer = io.BytesIO()
        img.save(buffer, format="PNG", optimize=True)
    except (OSError, ValueError):  # DataError is a ValueError
        return None
    return _data_uri(buffer.getvalue())


def _resolve(run_dir: Path, image: Any) -> Path | None:
    """Sample image paths are relative to the run folder, else taken as given."""
    if not isinstance(image, str) or not image:
        return None
    path = Path(image)
    if not path.is_absolute() and (run_dir / path).exists():
        return run_dir / path
    return path


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1, numeric_to: int | None = None) -> str:
    """An HTML table from already-escaped cells; columns from ``numeric_from`` on (up to
    ``numeric_to``, excluded) are right-aligned so numbers line up."""

    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="num"' if i >= numeric_from and (numeric_to is None or i < numeric_to) else ""
        return f"<{tag}{cls}>{text}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    """Mean of the numeric values of ``key``; steps that did not log it are ignored."""
    values = [r[key] for r in records if is_number(r.get(key))]
    return sum(values) / len(values) if values else None


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


# --- sections ---------------------------------------------------------------------

def _reliance_cell(reliance: Any) -> str:
    """Red when the model's answers do not change without the image, else green."""
    if not isinstance(reliance, dict) or not isinstance(reliance.get("collapsed"), bool):
        return MISSING
    message = reliance.get("message")
    detail = f" — {escape(message)}" if isinstance(message, str) and message else ""
    if reliance["collapsed"]:
        return f'<span class="bad">collapsed: ignores the image</span>{detail}'
    return f'<span class="good">uses the image</span>{detail}'


def _summary(results: dict[str, Any]) -> str:
    """Headline numbers; every row is skipped when its source block is absent."""
    rows: list[list[str]] = []
    for key, label in (("vqa", "VQA accuracy"), ("blank", "Blank-image accuracy")):
        block = results.get(key)
        if isinstance(block, dict):
            n = block.get("n")
            suffix = f" (n={n})" if is_number(n) else ""
            rows.append([label, fmt_pct(block.get("overall")) + suffix])
    chance = results.get("chance")
    if isinstance(chance, dict):
        rows.append(["Chance accuracy", fmt_pct(chance.get("overall"))])
    if "reliance" in results:
        rows.append(["Image reliance", _reliance_cell(results.get("reliance"))])
    ret = results.get("retention")
    if isinstance(ret, dict):
        ppl = f"{fmt_num(ret.get('base_ppl'))} → {fmt_num(ret.get('model_ppl'))}"
        rows.append(["Text perplexity (base → model)", ppl])
        rows.append(["Perplexity ratio", fmt_ratio(ret.get("ppl_ratio"))])
        counts = [
            f"{ret[k]} {k[2:]}" for k in ("n_prompts", "n_tokens") if is_number(ret.get(k))
        ]
        suffix = f" ({', '.join(counts)})" if counts else ""
        rows.append(
            ["Unchanged text-only answers", fmt_pct(ret.get("unchanged_share")) + suffix]
        )
    stage_ret = results.get("stage_retention")
    if isinstance(stage_ret, dict):
        for stage, values in stage_ret.items():
            if isinstance(values, dict):
                text = (
                    f"ppl {fmt_num(values.get('model_ppl'))}"
                    f" ({fmt_ratio(values.get('ppl_ratio'))})"
                )
                rows.append([f"Retention after {escape(str(stage))}", text])
    timings = results.get("timings")
    if isinstance(timings, dict):
        for name, seconds in timings.items():
            rows.append([f"Time: {escape(str(name))}", fmt_seconds(seconds)])
    if not rows:
        return _note("eval.json has no recognised results.")
    # Values mix numbers and verdict text, so they stay left-aligned.
    return _table(["metric", "value"], rows, numeric_from=2)


def _stage_table(run_dir: Path) -> str:
    """Per-stage step count, last loss and throughput, read from the metrics."""
    rows = []
    for name, records in load_stages(run_dir):
        losses = [r["loss"] for r in records if is_number(r.get("loss"))]
        tail = losses[-max(1, len(losses) // 20):]
        last = sum(tail) / len(tail) if tail else None
        times = [r["time_s"] for r in records if is_number(r.get("time_s"))]
        rows.append([
            escape(name),
            str(len(records)),
            fmt_num(last, 4),
            fmt_num(_mean(records, "tokens_per_s"), 0),
            fmt_num(_mean(records, "images_per_s"), 1),
            fmt_seconds(max(times) if times else None),
        ])
    header = ["stage", "steps", "final loss (last 5%)", "tokens/s", "images/s", "time"]
    return _table(header, rows) if rows else ""


def _skip_table(run_dir: Path) -> str:
    """Per stage: how many samples ``on_error = "skip"`` left out, and the first few reasons."""
    rows = []
    for name in stage_names(run_dir):
        path = Path(run_dir) / "stages" / name / SKIPPED_FILE
        if not path.is_file():
            continue
        skips = read_skips(path)
        reasons = "<br>".join(escape(str(s.get("reason", ""))) for s in skips[:SKIP_REASONS])
        more = f"<br>… {len(skips) - SKIP_REASONS} more in {escape(str(path.relative_to(run_dir)))}" \
            if len(skips) > SKIP_REASONS else ""
        rows.append([escape(name), str(len(skips)), (reasons + more) or MISSING])
    if not rows:
        return ""
    return "<h3>Skipped samples</h3>" + _table(["stage", "skipped", "first reasons"], rows, numeric_to=2)


def _per_type_table(results: dict[str, Any]) -> str:
    """Accuracy per question type, with the image-minus-blank gap spelled out."""
    blocks = {k: results.get(k) for k in ("vqa", "blank", "chance")}
    if not isinstance(blocks["vqa"], dict) and not isinstance(blocks["blank"], dict):
        return ""

    def get(key: str, qtype: str) -> Any:
        block = blocks[key]
        if not isinstance(block, dict):
            return None
        if qtype == "overall":
            return block.get("overall")
        per_type = block.get("per_type")
        return per_type.get(qtype) if isinstance(per_type, dict) else None

    rows = []
    for qtype in question_types(results):
        image, blank = get("vqa", qtype), get("blank", qtype)
        gap = image - blank if is_number(image) and is_number(blank) else None
        gap_text = f"{100 * gap:+.1f} pt" if gap is not None else MISSING
        name = f"<b>{escape(qtype)}</b>" if qtype == "overall" else escape(qtype)
        rows.append(
            [name, fmt_pct(image), fmt_pct(blank), fmt_pct(get("chance", qtype)), gap_text]
        )
    return _table(["question type", "with image", "blank image", "chance", "gap"], rows)


def _samples(run_dir: Path, samples: Any, max_samples: int) -> str:
    """A grid of cards: thumbnail, question, answer, truth; border shows correctness."""
    if not isinstance(samples, list) or not samples:
        return _note("No samples in eval.json.")
    cards = []
    for sample in samples[:max_samples]:
        if not isinstance(sample, dict):
            continue
        path = _resolve(run_dir, sample.get("image"))
        uri = _thumbnail(path) if path is not None else None
        if uri is not None:
            img = f'<img src="{uri}" alt="{escape(str(sample.get("image")))}">'
        else:
            img = '<div class="noimg">no image</div>'
        correct = sample.get("correct")
        cls = "" if not isinstance(correct, bool) else " ok" if correct else " wrong"
        qtype = sample.get("question_type")
        type_line = f'<p class="note">{escape(str(qtype))}</p>' if qtype else ""
        cards.append(
            f'<div class="card{cls}">{img}{type_line}'
            f"<p><b>Q:</b> {escape(str(sample.get('question', '')))}</p>"
            f"<p><b>A:</b> {escape(str(sample.get('answer', '')))}</p>"
            f"<p><b>Truth:</b> {escape(str(sample.get('truth', '')))}</p></div>"
        )
    more = len(samples) - max_samples
    extra = _note(f"{more} more samples not shown.") if more > 0 else ""
    return f'<div class="grid">{"".join(cards)}</div>{extra}'


# --- entry point --------------------------------------------------------------------

def write_report(run_dir: Path, *, title: str = "chiasm run", max_samples: int = 48) -> Path:
    """Write ``RUN/report.html`` (plus ``loss.png`` and ``accuracy.png``) and return its path.

    Works on any subset of a run folder: without ``eval.json`` only the training
    section is filled, without metrics only the evaluation sections are.
    ``max_samples`` caps the sample grid so the page stays small.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = _load_json(run_dir / "eval.json")
    loss_png = plot_loss_curves(run_dir, run_dir / "loss.png")
    acc_png = plot_accuracy(results, run_dir / "accuracy.png") if results else None

    meta = [f"run: {escape(str(run_dir.resolve()))}"]
    if results and isinstance(results.get("model"), str):
        meta.insert(0, f"model: {escape(results['model'])}")
    meta.append(f"generated {datetime.now().strftime('%Y-%m-%d %H:%M')}")

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{escape(title)}</h1><p class=\"meta\">{' · '.join(meta)}</p></header>",
        "<section><h2>Summary</h2>",
        _summary(results) if results else _note("No eval.json in this run yet."),
        "</section><section><h2>Training</h2>",
        _img_tag(loss_png, "loss curves") if loss_png else _note("No training metrics found."),
        _stage_table(run_dir),
        _skip_table(run_dir),
        "</section>",
    ]
    if results:
        parts += [
            "<section><h2>Accuracy by question type</h2>",
            _img_tag(acc_png, "accuracy by question type"),
            _per_type_table(results) or _note("No VQA results in eval.json."),
            "</section><section><h2>Samples</h2>",
            _samples(run_dir, results.get("samples"), max_samples),
            "</section>",
        ]
    parts.append("</body></html>\n")

    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
