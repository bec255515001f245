"""The diffusion run's HTML page: loss, forward and reverse process, grids, the w sweep, the numbers.

Built with the VLM report's pieces (its CSS, its embedded-PNG tags, its table and number
formats), so both pages look and behave alike: one self-contained file, sections that are
missing get a note instead of an exception.
"""

from __future__ import annotations

import json
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from chiasm.report.html import CSS, _img_tag, _note, _table, fmt_num, fmt_pct

PICTURES = (("loss.png", "Training loss"), ("forward.png", "Forward process: x_0 noised to chosen t (columns)"),
            ("reverse.png", "Reverse process: one sample per row, denoised step by step (left to right)"),
            ("sweep.png", "Guidance sweep: FID and recognition against w; precision against recall"))


def _sweep_table(result: dict[str, Any]) -> str:
    fid = result["fid_name"]
    rows = [[fmt_num(r["guidance"], 1), fmt_num(r[fid], 2), fmt_pct(r.get("recognition")), fmt_pct(r["precision"]),
             fmt_pct(r["recall"]), f"{r['sampler']} {r['steps']}"] for r in result.get("sweep", [])]
    return _table(["w", fid, "recognised as asked", "precision", "recall", "sampler"], rows, numeric_from=0,
                  numeric_to=5)


def _sampler_table(result: dict[str, Any]) -> str:
    s = result.get("samplers")
    if not s:
        return ""
    fid = result["fid_name"]
    names = [k for k, v in s.items() if isinstance(v, dict)]  # ddim, ddim_eta..., ddpm
    rows = [[name, str(s[name]["steps"]), str(s[name]["network_evaluations"]), fmt_num(s[name][fid], 2),
             fmt_pct(s[name].get("recognition")), fmt_num(s[name]["seconds"], 0)] for name in names]
    ratios = "".join(f"<p>{fid} ratio {escape(name)} / ddpm: {fmt_num(s[name][fid] / s['ddpm'][fid], 3)}</p>"
                     for name in names if name != "ddpm")
    if s.get("seeds", 1) > 1:
        ratios += f"<p>each {escape(fid)} the mean over {int(s['seeds'])} seeds, the same seeds for every sampler</p>"
    return ("<h2>DDIM against DDPM</h2>" + _table(["sampler", "steps", "network evaluations", fid,
                                                   "recognised", "seconds"], rows) + ratios)


def write_diffusion_report(folder: Path, title: str = "chiasm diffusion") -> Path:
    """``folder/report.html`` from the PNGs and ``eval.json`` that train / eval left in ``folder``."""
    parts = [f"<h1>{escape(title)}</h1><p class='meta'>{escape(str(folder))} · "
             f"{datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]
    result = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").is_file() else None
    if result:
        parts.append("<h2>Sample quality against the held-out split</h2>")
        parts.append(f"<p class='note'>{escape(result['fid_name'])}: Fréchet distance on the features of a "
                     f"classifier trained by chiasm on this domain (held-out accuracy "
                     f"{fmt_pct(result.get('classifier_test_accuracy'))}), {result['n_samples']} samples against "
                     f"{result['n_real']} test images; not comparable with Inception FIDs.</p>")
        parts.append(_sweep_table(result))
        parts.append(_sampler_table(result))
    else:
        parts.append(_note("no eval.json yet: run chiasm diffusion eval"))
    for name, caption in PICTURES:
        if (folder / name).is_file():
            parts.append(f"<h2>{escape(caption)}</h2>" + _img_tag(folder / name, caption))
    grids = sorted(folder.glob("grid_w*.png"), key=lambda p: float(p.stem[len("grid_w"):]))
    if grids:
        parts.append("<h2>Samples per guidance scale (one column per class)</h2>")
        for g in grids:
            parts.append(f"<h3>w = {escape(g.stem[len('grid_w'):])}</h3>" + _img_tag(g, g.stem))
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    out = folder / "report.html"
    out.write_text(html)
    return out
