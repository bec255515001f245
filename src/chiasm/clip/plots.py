"""Pictures of a CLIP run: loss and temperature over training, the confusion matrix, the embedding space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from chiasm.jsonl import read_records
from chiasm.report.plots import save_figure


def plot_training(metrics: Path, out: Path) -> Path | None:
    """Loss (left) and the learnt temperature 1/scale (right) against the step."""
    try:
        rows = [r for r in read_records(metrics) if "step" in r and "loss" in r]
    except (OSError, ValueError):
        return None
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(9, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, [r["loss"] for r in rows], color="#1f77b4")
    ax1.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ax2.plot(steps, [r["temperature"] for r in rows], color="#d62728")
    ax2.set(xlabel="step", ylabel="temperature (1 / logit scale)", title="learnt temperature")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_confusion(result: dict, out: Path) -> Path:
    m = np.array(result["confusion"], dtype=float)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    classes = result["classes"]
    size = 1.2 + 0.45 * len(classes)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"zero-shot confusion (top-1 {result['top1']:.1%})")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_embeddings(image_emb: torch.Tensor, labels: list[int], class_emb: torch.Tensor, classes: list[str],
                    out: Path, max_points: int = 3000) -> Path:
    """Images (dots, coloured by class) and class prompts (stars) in the top-2 principal components."""
    img = image_emb[:max_points].float()
    lab = np.array(labels[:max_points])
    both = torch.cat([img, class_emb.float()])
    centred = both - both.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    colours = [f"C{i % 10}" for i in range(len(classes))]
    for c, name in enumerate(classes):
        pts = xy[: len(img)][lab == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=5, alpha=0.4, color=colours[c], label=name)
        sx, sy = xy[len(img) + c]
        ax.scatter([sx], [sy], marker="*", s=260, color=colours[c], edgecolors="black", linewidths=0.8)
    ax.set(title="embedding space (PCA): images ·, class prompts ★", xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=3, loc="best")
    fig.tight_layout()
    return save_figure(fig, out)
