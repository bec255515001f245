"""The speech run's HTML page: a WER/CER table, then every clip with a player, reference, hypothesis and diff.

It reuses chiasm's report styling and table helper; audio is embedded as data URIs (16-bit WAV)
so that the page stays one file, as the VLM report does with its images.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime
from html import escape
from pathlib import Path

import numpy as np

from chiasm.report.html import CSS, _img_tag, _note, _table
from chiasm.report.plots import plot_loss_curves
from chiasm.speech.audio import load_audio

EXTRA_CSS = """
.clip { border-bottom: 1px solid #eee; padding: 0.4em 0; }
.clip audio { height: 28px; vertical-align: middle; }
del { background: #ffebe9; color: #cf222e; } ins { background: #dafbe1; color: #1a7f37; text-decoration: none; }
"""


def _wav_uri(path: str, max_s: float = 30.0) -> str | None:
    import soundfile as sf

    try:
        audio = load_audio(path)[: int(max_s * 16000)]
    except (OSError, ValueError):
        return None
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1, 1), 16000, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def diff_html(diff: list) -> str:
    """Word diff: deleted reference words struck out, inserted hypothesis words marked."""
    out = []
    for op, ref, hyp in diff:
        if op == "equal":
            out.append(escape(ref))
        elif op == "delete":
            out.append(f"<del>{escape(ref)}</del>")
        elif op == "insert":
            out.append(f"<ins>{escape(hyp)}</ins>")
        else:
            out.append(f"<del>{escape(ref)}</del> <ins>{escape(hyp)}</ins>")
    return " ".join(out)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def write_speech_report(out: Path, results: dict[str, dict], *, title: str = "chiasm speech",
                        max_clips: int = 40) -> Path:
    """``out/report.html`` from ``{label: evaluate_all(...)}``; the last label's transcripts are shown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(results)
    names = [s["name"] for s in results[labels[0]]["sets"]]
    rows = []
    for n in names:
        cells = [escape(n)]
        for lab in labels:
            s = next(x for x in results[lab]["sets"] if x["name"] == n)
            cells += [_pct(s["wer"]), _pct(s["cer"])]
        cells.append(str(s["clips"]))
        rows.append(cells)
    header = ["data set"] + [f"{escape(lab)} {k}" for lab in labels for k in ("WER", "CER")] + ["clips"]
    loss_png = plot_loss_curves(out, out / "loss.png")
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(title)}</title><style>{CSS}{EXTRA_CSS}</style></head><body>",
             f"<header><h1>{escape(title)}</h1><p class=\"meta\">models: "
             f"{escape(', '.join(str(results[lab]['model']) for lab in labels))} · beams: "
             f"{results[labels[-1]]['num_beams']} · generated {datetime.now().strftime('%Y-%m-%d %H:%M')}</p></header>",
             "<section><h2>Word and character error rates</h2>", _table(header, rows),
             _note("WER/CER after Whisper's English normaliser (English) or its basic normaliser (other "
                   "languages), corpus-level, computed with jiwer."), "</section>"]
    if loss_png:
        parts += ["<section><h2>Training</h2>", _img_tag(loss_png, "loss curves"), "</section>"]
    last = results[labels[-1]]
    for s in last["sets"]:
        parts.append(f"<section><h2>{escape(s['name'])} ({escape(labels[-1])})</h2>")
        for r in s["samples"][:max_clips]:
            uri = _wav_uri(r["audio"])
            player = f'<audio controls preload="none" src="{uri}"></audio>' if uri else "(audio unreadable)"
            parts.append(f'<div class="clip"><b>{escape(r["id"])}</b> {player}'
                         f"<p>ref: {escape(r['ref'])}</p><p>hyp: {escape(r['hyp'])}</p>"
                         f"<p>diff: {diff_html(r['diff'])}</p></div>")
        if len(s["samples"]) > max_clips:
            parts.append(_note(f"{len(s['samples']) - max_clips} more clips in speech_eval.json"))
        parts.append("</section>")
    parts.append("</body></html>\n")
    page = out / "report.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
