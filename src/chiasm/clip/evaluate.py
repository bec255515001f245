"""``chiasm clip eval``: zero-shot classification (labelled sets) or retrieval (caption sets), with
JSON metrics, plots and an HTML report written to the output folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from chiasm.clip.config import ClipDataConfig
from chiasm.clip.labelled import EVAL_TEMPLATES, TRAIN_TEMPLATES, check_templates
from chiasm.clip.model import ClipModel
from chiasm.clip.plots import plot_confusion, plot_embeddings, plot_training
from chiasm.clip.sources import build_pairs
from chiasm.clip.zeroshot import classifier, image_embeddings, retrieval, zero_shot

log = logging.getLogger(__name__)
METRICS_FILE = "clip_metrics.json"


def training_templates(model_dir: Path) -> list[str] | None:
    """The templates a saved model was trained with (None if it did not record them)."""
    path = Path(model_dir) / "training.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("data", {}).get("kind") not in ("digits", "fashion-mnist"):
        return None
    return meta.get("train_templates") or list(TRAIN_TEMPLATES)


def evaluate_clip(model: ClipModel, data: ClipDataConfig, out: Path | None, *, templates: list[str] | None = None,
                  model_dir: Path | None = None, batch_size: int = 512, run_dir: Path | None = None) -> dict:
    t0 = time.perf_counter()
    pairs = build_pairs(data)
    emb = image_embeddings(model, pairs, batch_size)
    result: dict = {"data": pairs.name, "n": len(pairs)}
    if pairs.labels is not None:
        templates = check_templates(templates or list(EVAL_TEMPLATES), "templates")
        weights = classifier(model, pairs.classes, templates)
        zs = zero_shot(model, pairs, templates, image_emb=emb, weights=weights)
        seen = training_templates(model_dir) if model_dir is not None else None
        zs["templates_seen_in_training"] = sorted(set(templates) & set(seen)) if seen is not None else None
        result["zero_shot"] = zs
    else:
        result["retrieval"] = retrieval(model, pairs, image_emb=emb)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
        if "zero_shot" in result:
            plot_confusion(result["zero_shot"], out / "confusion.png")
            plot_embeddings(emb, pairs.labels, weights, pairs.classes,
                            out / "embeddings.png")
        metrics = (run_dir or out) / "metrics.jsonl"
        if metrics.is_file():
            plot_training(metrics, out / "training.png")
        from chiasm.clip.report import write_clip_report

        write_clip_report(out, result)
    return result


def summary_lines(result: dict) -> list[str]:
    lines = [f"data: {result['data']} ({result['n']} images)"]
    if "zero_shot" in result:
        zs = result["zero_shot"]
        top5 = next((k for k in zs if k.startswith("top") and k != "top1"), None)
        lines.append(f"zero-shot top-1: {zs['top1']:.1%}" + (f"  {top5}: {zs[top5]:.1%}" if top5 else ""))
        seen = zs.get("templates_seen_in_training")
        if seen:
            lines.append(f"warning: {len(seen)} evaluation template(s) were used in training: {seen}")
        worst = sorted((v, k) for k, v in zs["per_class_recall"].items() if v is not None)[:3]
        lines.append("lowest recall: " + ", ".join(f"{k} {v:.1%}" for v, k in worst))
    if "retrieval" in result:
        r = result["retrieval"]
        lines.append("image->text R@1/5/10: " + " / ".join(f"{r[f'i2t_R@{k}']:.1%}" for k in (1, 5, 10)))
        lines.append("text->image R@1/5/10: " + " / ".join(f"{r[f't2i_R@{k}']:.1%}" for k in (1, 5, 10)))
    return lines
