"""``chiasm speech eval``: WER/CER per data set, with the transcripts kept for the report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from chiasm.speech.config import SpeechData
from chiasm.speech.data_sets import load_set
from chiasm.speech.loader import Whisper
from chiasm.speech.metrics import error_rates, word_diff
from chiasm.speech.transcribe import EncoderOutputs, transcribe


def evaluate_set(w: Whisper, data: SpeechData, *, task: str = "transcribe", num_beams: int = 1,
                 batch_size: int = 8, on_error: str = "raise", encoded: EncoderOutputs | None = None) -> dict:
    """Transcribe every clip of ``data`` (grouped by language) and score it."""
    s = load_set(data, on_error=on_error)
    t0 = time.perf_counter()
    hyps: dict[str, str] = {}
    languages = sorted({x.language or "" for x in s.samples})
    for lang in languages:
        group = [x for x in s.samples if (x.language or "") == lang]
        texts = transcribe(w, [x.load() for x in group], language=lang or None, task=task, num_beams=num_beams,
                           batch_size=batch_size, encoded=encoded)
        hyps.update({x.id: t for x, t in zip(group, texts, strict=True)})
    seconds = time.perf_counter() - t0
    lang = s.samples[0].language if len({x.language for x in s.samples}) == 1 else None
    rates = error_rates([x.text for x in s.samples], [hyps[x.id] for x in s.samples], lang)
    rows = [{"id": x.id, "audio": str(x.audio_path), "language": x.language, "ref": x.text, "hyp": hyps[x.id],
             "diff": word_diff(x.text, hyps[x.id], x.language)} for x in s.samples]
    audio_s = sum(len(x.load()) for x in s.samples) / 16000
    return {"name": data.name, "language": lang, **rates, "num_beams": num_beams, "clips": len(s.samples),
            "skipped": len(s.skipped), "decode_s": seconds, "audio_s": audio_s, "samples": rows}


def evaluate_all(w: Whisper, sets: list[SpeechData], *, label: str, task: str = "transcribe", num_beams: int = 1,
                 batch_size: int = 8, on_error: str = "raise", encoded: EncoderOutputs | None = None) -> dict:
    """Every set scored; ``encoded`` (checked against ``w``'s encoder weights first) spares re-encoding clips."""
    if encoded is not None:
        encoded.bind(w)
    return {"model": label, "num_beams": num_beams,
            "sets": [evaluate_set(w, d, task=task, num_beams=num_beams, batch_size=batch_size, on_error=on_error,
                                  encoded=encoded) for d in sets]}


def format_table(results: dict[str, dict]) -> str:
    """One line per data set: WER/CER of each evaluated model (e.g. before and after fine-tuning)."""
    labels = list(results)
    head = f"{'data set':<24}{'clips':>6}" + "".join(f"{lab + ' WER':>16}{lab + ' CER':>16}" for lab in labels)
    lines = [head, "-" * len(head)]
    names = [s["name"] for s in next(iter(results.values()))["sets"]]
    for n in names:
        row = None
        cells = ""
        for lab in labels:
            row = next(s for s in results[lab]["sets"] if s["name"] == n)
            cells += "".join(f"{(f'{row[k]:.2%}' if row[k] is not None else '-'):>16}" for k in ("wer", "cer"))
        lines.append(f"{n:<24}{row['clips']:>6}" + cells)
    return "\n".join(lines)


def write_eval(out: Path, results: dict[str, dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speech_eval.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return path
