"""A self-contained HTML page for a CLIP run or evaluation (plots embedded, like the VLM's report)."""

from __future__ import annotations

from html import escape
from pathlib import Path

# The VLM report's page style and its helpers, so both reports look and behave alike.
from chiasm.report.html import CSS, _img_tag, _note, _table


def write_clip_report(folder: Path, result: dict, title: str = "chiasm CLIP") -> Path:
    parts = [f"<h1>{escape(title)}</h1>", f"<p class='meta'>data: {escape(str(result['data']))}, "
             f"{result['n']} images</p>"]
    zs = result.get("zero_shot")
    if zs:
        top5 = next((k for k in zs if k.startswith("top") and k != "top1"), None)
        rows = [["top-1", f"{zs['top1']:.1%}"]] + ([[top5, f"{zs[top5]:.1%}"]] if top5 else [])
        parts += ["<h2>Zero-shot classification</h2>", _table(["metric", "value"], rows)]
        seen = zs.get("templates_seen_in_training")
        parts.append(_note(f"{len(zs['templates'])} prompt templates; "
                           + ("none of them used in training" if seen == [] else
                              f"used in training too: {seen}" if seen else "training templates not recorded")))
        recall = [[escape(k), "—" if v is None else f"{v:.1%}"] for k, v in zs["per_class_recall"].items()]
        parts += ["<h3>Recall per class</h3>", _table(["class", "recall"], recall)]
        parts += [_img_tag(_maybe(folder / "confusion.png"), "confusion matrix"),
                  _img_tag(_maybe(folder / "embeddings.png"), "embedding space")]
    r = result.get("retrieval")
    if r:
        rows = [[k, f"{r[f'i2t_R@{k}']:.1%}", f"{r[f't2i_R@{k}']:.1%}"] for k in (1, 5, 10)]
        parts += ["<h2>Retrieval</h2>", _table(["k", "image→text R@k", "text→image R@k"], rows),
                  _note(f"{r['n_images']} images, {r['n_captions']} captions")]
    training = _maybe(folder / "training.png")
    if training:
        parts += ["<h2>Training</h2>", _img_tag(training, "loss and temperature")]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _maybe(path: Path) -> Path | None:
    return path if path.is_file() else None
