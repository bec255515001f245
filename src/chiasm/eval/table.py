"""Plain-text summary table of an evaluation, for the terminal."""

from __future__ import annotations


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def format_summary(results: dict) -> str:
    """Per-type accuracy with/without the image, chance, and retention lines."""
    lines = []
    vqa, blank, chance = results.get("vqa"), results.get("blank"), results.get("chance")
    if vqa:
        lines.append(f"{'question type':<14} {'image':>7} {'blank':>7} {'chance':>7}")
        for t in sorted(vqa["per_type"]):
            lines.append(f"{t:<14} {_pct(vqa['per_type'][t]):>7} {_pct(blank['per_type'].get(t)):>7} "
                         f"{_pct(chance['per_type'].get(t)):>7}")
        lines.append(f"{'overall':<14} {_pct(vqa['overall']):>7} {_pct(blank['overall']):>7} "
                     f"{_pct(chance['overall']):>7}   (n={vqa['n']})")
        lines.append(f"image reliance: {results['reliance']['message']}")
    r = results.get("retention")
    if r:
        lines.append(f"language retention: perplexity {r['model_ppl']:.3f} vs base {r['base_ppl']:.3f} "
                     f"(ratio {r['ppl_ratio']:.4f}); unchanged text answers {r['unchanged_share']:.0%} "
                     f"of {r['n_prompts']}")
    for name, s in results.get("stage_retention", {}).items():
        lines.append(f"  after stage {name}: perplexity {s['model_ppl']:.3f} (ratio {s['ppl_ratio']:.4f})")
    t = results.get("timings", {})
    if "total_s" in t:
        lines.append(f"total time {t['total_s']:.0f} s")
    return "\n".join(lines)


def print_summary(results: dict) -> None:
    print(format_summary(results))
