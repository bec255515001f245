"""Audio + transcript pairs: a JSONL manifest or a folder, checked sample by sample.

A manifest line is ``{"audio": PATH, "text": "...", "language": "de"}`` (``id`` optional;
a relative path is read from the manifest's folder). A folder holds ``NAME.wav`` (or .flac,
.ogg) beside ``NAME.txt``. A bad sample (unreadable or empty audio, an impossible sample rate,
over 30 s, an empty transcript, a transcript in another script than its language's) is an
error naming file and line, or, with ``on_error = "skip"``, a counted skip.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chiasm.data.sample import DataError
from chiasm.speech.audio import MAX_SECONDS, SAMPLE_RATE, load_audio
from chiasm.speech.tokens import language_code

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".raw")


@dataclass
class SpeechSample:
    id: str
    audio_path: Path
    text: str
    language: str | None
    audio: np.ndarray | None = None  # 16 kHz mono, filled by load()

    def load(self) -> np.ndarray:
        if self.audio is None:
            self.audio = load_audio(self.audio_path)
        return self.audio


@dataclass
class SpeechSet:
    name: str
    samples: list[SpeechSample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)


# Latin-script languages whose text must hold Latin letters; a transcript wholly in another script is refused.
_LATIN = {"en", "de", "es", "fr", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "ro", "hu", "tr", "ca"}


def check_text(text: str, language: str | None, where: str) -> str:
    """The stripped transcript; empty, or no Latin letter for a Latin-script language, is refused."""
    text = (text or "").strip()
    if not text:
        raise DataError(f"{where}: empty transcript")
    if language in _LATIN:
        letters = [c for c in text if c.isalpha()]
        if letters and not any("a" <= c.lower() <= "z" or "\u00c0" <= c <= "\u024f" for c in letters):
            raise DataError(f"{where}: the transcript is not in a Latin script, but its language is {language!r}")
    return text


def check_audio(sample: SpeechSample, where: str) -> None:
    audio = sample.load()
    if len(audio) > MAX_SECONDS * SAMPLE_RATE:
        raise DataError(f"{where}: {sample.audio_path} is {len(audio) / SAMPLE_RATE:.1f} s long; training and "
                        f"evaluation take clips of at most {MAX_SECONDS:.0f} s (cut it, or transcribe it, which "
                        "windows long audio)")


def _finish(name: str, candidates: list[tuple[str, dict, str]], root: Path, on_error: str,
            default_language: str | None) -> SpeechSet:
    out = SpeechSet(name, [])
    for sid, rec, where in candidates:
        try:
            if "audio" not in rec or not isinstance(rec["audio"], str):
                raise DataError(f"{where}: no 'audio' path")
            lang = language_code(rec.get("language") or default_language)
            text = check_text(rec.get("text", ""), lang, where)
            path = Path(rec["audio"])
            sample = SpeechSample(sid, path if path.is_absolute() else root / path, text, lang)
            check_audio(sample, where)
        except (DataError, ValueError) as exc:
            if on_error != "skip":
                raise DataError(str(exc)) from None
            out.skipped.append((sid, str(exc)))
            continue
        out.samples.append(sample)
    if out.skipped:
        log.warning("%s: skipped %d of %d samples", name, len(out.skipped), len(candidates))
    return out


def read_manifest(path: str | Path, *, on_error: str = "raise", language: str | None = None,
                  max_samples: int | None = None) -> SpeechSet:
    """Samples of a JSONL manifest (or, for a folder, its NAME.wav + NAME.txt pairs), audio loaded and checked."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path, on_error=on_error, language=language, max_samples=max_samples)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    candidates = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except ValueError:
            rec = {}
            if on_error != "skip":
                raise DataError(f"{where}: not a JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: not a JSON object")
        candidates.append((str(rec.get("id", f"{path.stem}-{n}")), rec, where))
        if max_samples and len(candidates) >= max_samples:
            break
    if not candidates:
        raise DataError(f"{path}: the manifest holds no samples")
    return _finish(path.stem, candidates, path.parent, on_error, language)


def read_folder(folder: Path, *, on_error: str = "raise", language: str | None = None,
                max_samples: int | None = None) -> SpeechSet:
    """NAME.wav (.flac, .ogg, ...) + NAME.txt pairs, in sorted order."""
    audio = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not audio:
        raise DataError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in the folder")
    candidates = []
    for p in audio[:max_samples] if max_samples else audio:
        txt = p.with_suffix(".txt")
        text = txt.read_text(encoding="utf-8") if txt.is_file() else ""
        candidates.append((p.stem, {"audio": str(p), "text": text}, str(txt if txt.is_file() else p)))
    return _finish(folder.name, candidates, folder, on_error, language)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
