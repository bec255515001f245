"""Static plots for the run report: loss curves and accuracy bars.

Uses the object-oriented matplotlib API (``Figure`` + ``FigureCanvasAgg``) rather
than ``pyplot`` so that writing a report never touches global backend state and
works the same on a headless training box as in a notebook.

Every function here tolerates a partial run folder: a stage that crashed leaves a
half-written last line, an evaluation may not have run yet. Missing data gives
``None`` instead of an exception, so a report can always be written.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from chiasm.jsonl import read_records

log = logging.getLogger(__name__)
DPI = 110
STAGE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
IMAGE_COLOR = "#1f77b4"
BLANK_COLOR = "#bdbdbd"


def is_number(value: Any) -> bool:
    """True for finite ints/floats; bools are excluded because JSON flags are not data."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read one ``metrics.jsonl`` file into a list of step records.

    Lines that are blank, not valid JSON or not objects are skipped: a run killed
    mid-write leaves a truncated last line, and that must not hide every step
    written before it. A missing file gives an empty list.
    """
    return read_records(path)


def stage_names(run_dir: Path) -> list[str]:
    """Stage folder names in training order.

    ``stages.json`` (a list of names) is the authority because names such as
    ``align`` and ``instruct`` do not sort in the order they ran; folders it does
    not mention are appended by name so that no stage silently disappears.
    """
    stages_dir = Path(run_dir) / "stages"
    if not stages_dir.is_dir():
        return []
    present = sorted(p.name for p in stages_dir.iterdir() if p.is_dir())
    order: list[str] = []
    try:
        listed = json.loads((Path(run_dir) / "stages.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        listed = None
    if isinstance(listed, list):
        order = [name for name in listed if isinstance(name, str) and name in present]
        order = list(dict.fromkeys(order))
    return order + [name for name in present if name not in order]


def load_stages(run_dir: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(stage name, records)`` for every stage that logged at least one step."""
    stages = []
    for name in stage_names(run_dir):
        records = read_metrics(Path(run_dir) / "stages" / name / "metrics.jsonl")
        if records:
            stages.append((name, records))
    return stages


def ema(values: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average.

    The correction (as in Adam) keeps the first points at the data instead of
    pulling them toward zero, which would otherwise look like a fake loss drop.
    Non-finite values are carried over so one NaN step does not erase the line.
    """
    alpha = 2.0 / (span + 1.0)
    smoothed: list[float] = []
    avg, weight = 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            avg = (1.0 - alpha) * avg + alpha * value
            weight = (1.0 - alpha) * weight + alpha
        smoothed.append(avg / weight if weight > 0 else math.nan)
    return smoothed


def _stage_series(records: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """Local step index (starting at 0), loss and lr of one stage, NaN where absent."""
    steps = [r.get("step") for r in records]
    ints = [s for s in steps if isinstance(s, int) and not isinstance(s, bool)]
    if len(ints) == len(steps):
        first = min(ints)
        local = [s - first for s in ints]
    else:
        local = list(range(len(records)))
    loss = [float(r["loss"]) if is_number(r.get("loss")) else math.nan for r in records]
    lr = [float(r["lr"]) if is_number(r.get("lr")) else math.nan for r in records]
    return local, loss, lr


def save_figure(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=DPI, format="png")
    return out


# Accuracy metric of each pre-alignment objective -> what it measures.
PRE_METRICS = {"retrieval_acc": "retrieval accuracy", "word_acc": "tokens nearest their word"}


def plot_loss_curves(run_dir: Path, out: Path) -> Path | None:
    """Plot all stages end to end on one axis and save a PNG to ``out``.

    One shared x axis makes the hand-off between stages visible (a loss jump when
    the LM is unfrozen is the thing to look for). Each stage gets its own colour:
    raw loss faint, an EMA on top, restarted per stage because the loss scale
    changes between stages. The learning rate goes on a twin axis so warm-up and
    decay can be matched against the loss. Returns ``None`` without metrics.
    """
    # Pre-alignment (contrastive or word targets) logs an accuracy, runs many cheap steps and has a
    # loss on another scale: it gets its own panel instead of squashing the LM stages into a corner.
    pre, series = [], []
    for i, (name, records) in enumerate(load_stages(run_dir)):
        if any(k in r for r in records for k in PRE_METRICS):
            pre.append((i, name, records))
        else:
            series.append((i, name, *_stage_series(records)))
    series = [s for s in series if any(math.isfinite(v) for v in s[3])]
    if not series and not pre:
        return None

    fig = Figure(figsize=(13 if pre and series else 10, 4.2), layout="constrained")
    if pre and series:
        grid = fig.add_gridspec(1, 2, width_ratios=[1, 3])
        _plot_prealign(fig.add_subplot(grid[0]), pre)
        ax = fig.add_subplot(grid[1])
    elif pre:
        _plot_prealign(fig.add_subplot(), pre)
        return save_figure(fig, out)
    else:
        ax = fig.add_subplot()
    lr_ax = None
    lr_peaks: list[float] = []
    offset = 0
    all_loss: list[float] = []
    for i, (index, name, local, loss, lr) in enumerate(series):
        color = STAGE_COLORS[index % len(STAGE_COLORS)]
        xs = [offset + s for s in local]
        _draw_loss(ax, xs, loss, color, name)
        all_loss.extend(v for v in loss if math.isfinite(v))
        if any(math.isfinite(v) for v in lr):
            lr_peaks.append(max(v for v in lr if math.isfinite(v)))
            if lr_ax is None:
                lr_ax = ax.twinx()
            label = "learning rate" if i == 0 else None
            lr_ax.plot(xs, lr, color="#555555", linestyle="--", linewidth=1.0, label=label)
        if i > 0:
            ax.axvline(offset - 0.5, color="#888888", linewidth=1.0, linestyle=":")
        ax.text(
            offset, 1.01, name, transform=ax.get_xaxis_transform(),
            ha="left", va="bottom", fontsize=9, color=color,
        )
        offset = max(xs) + 1

    # The first steps of a fresh bridge often sit far above the rest; without a
    # cap they squash the part of the curve that matters into a flat line.
    all_loss.sort()
    if len(all_loss) >= 20:
        p98 = all_loss[int(0.98 * (len(all_loss) - 1))]
        if all_loss[-1] > 1.5 * p98 > 0:
            ax.set_ylim(top=1.3 * p98)
    ax.set_xlabel("step (stages laid end to end)")
    ax.set_ylabel("loss (faint: raw, solid: EMA)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr_ax is not None:
        lr_ax.set_ylabel("learning rate")
        low, high = min(lr_peaks), max(lr_peaks)
        if low > 0 and high / low > 10:
            # Stages often differ by orders of magnitude (1e-3 for the bridge,
            # 2e-5 for LM fine-tuning); on a linear axis the small one is a flat
            # line at zero. The floor keeps decay-to-zero tails from stretching it.
            lr_ax.set_yscale("log")
            lr_ax.set_ylim(bottom=low / 100, top=high * 2)
        else:
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            lr_ax.set_ylim(bottom=0)
        more_h, more_l = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    return save_figure(fig, out)


def _draw_loss(ax: Any, xs: list[int], loss: list[float], color: str, label: str) -> int:
    """Raw loss faint, its EMA solid on top; returns the EMA span so other series can share it."""
    span = max(1, min(50, len(loss) // 10))
    ax.plot(xs, loss, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(xs, ema(loss, span), color=color, linewidth=1.8, label=label)
    return span


def _plot_prealign(ax: Any, stages: list[tuple[int, str, list[dict[str, Any]]]]) -> None:
    """Loss (EMA) and accuracy of pre-alignment stages (in-batch retrieval, or tokens on their word)."""
    acc_ax = ax.twinx()
    offset = 0
    for index, name, records in stages:
        color = STAGE_COLORS[index % len(STAGE_COLORS)]
        local, loss, _ = _stage_series(records)
        key = next(k for k in PRE_METRICS if any(k in r for r in records))
        acc = [float(r[key]) if is_number(r.get(key)) else math.nan for r in records]
        xs = [offset + s for s in local]
        span = _draw_loss(ax, xs, loss, color, f"{name} loss")
        acc_ax.plot(xs, ema(acc, span), color="#555555", linestyle="--", linewidth=1.2,
                    label=f"{name} {PRE_METRICS[key]}")
        offset = max(xs, default=offset) + 1
    ax.set_xlabel("step")
    ax.set_ylabel("pre-alignment loss")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1)
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(True, alpha=0.3)
    ax.set_title("pre-alignment (no LM pass)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    more_h, more_l = acc_ax.get_legend_handles_labels()
    ax.legend(handles + more_h, labels + more_l, loc="center right", fontsize=8)


def _per_type(block: Any) -> dict[str, float]:
    """``per_type`` plus ``overall`` of one eval block, numbers only."""
    if not isinstance(block, dict):
        return {}
    values: dict[str, float] = {}
    per_type = block.get("per_type")
    if isinstance(per_type, dict):
        values.update({str(k): float(v) for k, v in per_type.items() if is_number(v)})
    if is_number(block.get("overall")):
        values["overall"] = float(block["overall"])
    return values


def question_types(results: dict[str, Any]) -> list[str]:
    """Question types found in any block, sorted, with ``overall`` last."""
    names: set[str] = set()
    for key in ("vqa", "blank", "chance"):
        names.update(_per_type(results.get(key)))
    names.discard("overall")
    return [*sorted(names), "overall"]


def plot_accuracy(results: dict[str, Any], out: Path) -> Path | None:
    """Grouped bars per question type: with the image vs. with a blank image.

    The blank-image bar is the control: if it is as tall as the real one the
    model answers from the question alone. The dashed line per group is chance,
    the floor both should clear. Returns ``None`` when neither VQA block exists.
    """
    if not isinstance(results, dict):
        return None
    image, blank = _per_type(results.get("vqa")), _per_type(results.get("blank"))
    chance = _per_type(results.get("chance"))
    if not image and not blank:
        return None
    groups = question_types(results)

    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.38
    xs = list(range(len(groups)))
    for shift, values, color, label in (
        (-width / 2, image, IMAGE_COLOR, "with image"),
        (width / 2, blank, BLANK_COLOR, "blank image"),
    ):
        if not values:
            continue
        heights = [values.get(g, math.nan) for g in groups]
        bars = ax.bar([x + shift for x in xs], heights, width, color=color, label=label)
        if len(groups) <= 12:
            labels = ["" if math.isnan(h) else f"{100 * h:.0f}" for h in heights]
            ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    chance_label: str | None = "chance"
    for x, group in zip(xs, groups, strict=False):
        if group in chance:
            ax.hlines(
                chance[group], x - 0.45, x + 0.45, colors="black",
                linestyles="dashed", linewidth=1.2, label=chance_label, zorder=3,
            )
            chance_label = None
    if len(groups) > 1:
        ax.axvline(len(groups) - 1.5, color="#888888", linewidth=0.8, linestyle=":")
    crowded = len(groups) > 6
    ax.set_xticks(
        xs, groups, rotation=30 if crowded else 0, ha="right" if crowded else "center"
    )
    ax.set_ylim(0, 1.08)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    # Above the axes, so a bar near 100% is never hidden behind the legend.
    ax.legend(
        loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, fontsize=8, frameon=False
    )
    return save_figure(fig, out)
