"""Synthetic speech sets spoken by Debian's espeak-ng from real sentences (Debian fortunes).

Sentences come from fortune files (German ``fortunes-de``, Spanish ``fortunes-es``, English
``fortunes``), cut into sentences of 4-16 words with no digits (a digit's spoken form differs
by normaliser). Train and held-out are split *by sentence* (a hash of its normalised text),
so no held-out sentence was ever heard in training, whatever the voice. Each clip gets a voice
variant, speed and pitch drawn from a seeded generator: the set is a pure function of the seed.
Accented English: English sentences spoken by espeak-ng's regional English voices, with one
voice (``heldout_voice``) kept out of training entirely.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from chiasm.data.sample import DataError
from chiasm.speech.manifest import write_manifest

FORTUNES = Path("/usr/share/games/fortunes")
# Fortune files of plain prose (not ascii art, lists of names or dialogue), per language.
FORTUNE_FILES = {
    "de": ["de/sprichworte.u8", "de/zitate.u8", "de/sprueche.u8", "de/wusstensie.u8", "de/murphy.u8",
           "de/regeln.u8", "de/tips.u8", "de/lieberals.u8", "de/letzteworte.u8", "de/stilblueten.u8"],
    "es": ["es/refranes.fortunes.u8", "es/proverbios.fortunes.u8", "es/sabiduria.fortunes.u8", "es/vida.fortunes.u8",
           "es/filosofia.fortunes.u8", "es/leydemurphy.fortunes.u8", "es/verdad.fortunes.u8"],
    "en": ["fortunes.u8", "cookie.u8", "education.u8", "food.u8", "humorists.u8", "wisdom.u8", "work.u8"],
}
DEBIAN_PACKAGE = {"de": "fortunes-de", "es": "fortunes-es", "en": "fortunes"}
# espeak-ng voice variants (the +name suffix) that change timbre without needing mbrola.
VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f3", "+f4", "+klatt", "+klatt2"]
ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-us-nyc",
           "en-029"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ALLOWED = {"de": "a-zA-ZäöüÄÖÜß", "es": "a-zA-ZáéíóúüñÁÉÍÓÚÜÑ", "en": "a-zA-Z"}


def sentences(language: str, root: Path = FORTUNES, min_words: int = 4, max_words: int = 16) -> list[str]:
    """Distinct prose sentences of the language's fortune files, in file order."""
    if language not in FORTUNE_FILES:
        raise ValueError(f"no fortune texts for language {language!r}; known: {', '.join(FORTUNE_FILES)}")
    ok = re.compile(rf"^[{_ALLOWED[language]}][{_ALLOWED[language]} ,;:'\-]*[.!?]$")
    out, seen = [], set()
    files = [root / f for f in FORTUNE_FILES[language] if (root / f).is_file()]
    if not files:
        raise DataError(f"{root}: no {language} fortune files; install Debian's {DEBIAN_PACKAGE[language]} "
                        "(scripts/setup.sh does, as root)")
    for f in files:
        for fortune in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [ln.strip() for ln in fortune.splitlines() if ln.strip() and not ln.strip().startswith("--")]
            text = " ".join(lines)
            for s in _SENTENCE_END.split(text):
                s = re.sub(r"\s+", " ", s).strip().strip('"')
                n = len(s.split())
                key = s.lower()
                if min_words <= n <= max_words and ok.match(s) and key not in seen:
                    seen.add(key)
                    out.append(s)
    return out


def is_heldout(sentence: str, fraction: float) -> bool:
    """Whether a sentence belongs to the held-out split: a hash of its text, independent of order and seed."""
    h = int(hashlib.sha1(sentence.lower().encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def espeak(text: str, voice: str, out: Path, *, speed: int = 160, pitch: int = 50) -> Path:
    """Speak ``text`` into a WAV file (espeak-ng writes 22,050 Hz; the loader resamples)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh does, as root)")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text], check=True,
                   capture_output=True, timeout=60)
    return out


@dataclass
class SynthSpec:
    """One synthetic set: how many sentences of which language, spoken by which voices."""

    language: str = "de"
    n_train: int = 200
    n_heldout: int = 60
    heldout_fraction: float = 0.25
    voices: tuple[str, ...] = ("de",)  # base voices of the training split
    heldout_voices: tuple[str, ...] | None = None  # None: the training voices
    text_language: str | None = None  # the sentences' language when it differs from the label (accents)
    seed: int = 0


def build(spec: SynthSpec, out: Path) -> dict[str, Path]:
    """Write ``out/{train,heldout}.jsonl`` and their WAV files; returns the manifests' paths.

    An existing manifest with the same spec is reused (the files are a pure function of it).
    """
    out = Path(out)
    stamp = out / "spec.txt"
    manifests = {split: out / f"{split}.jsonl" for split in ("train", "heldout")}
    if stamp.is_file() and stamp.read_text() == repr(spec) and all(p.is_file() for p in manifests.values()):
        return manifests
    pool = sentences(spec.text_language or spec.language)
    train = [s for s in pool if not is_heldout(s, spec.heldout_fraction)]
    held = [s for s in pool if is_heldout(s, spec.heldout_fraction)]
    rng = random.Random(spec.seed)
    rng.shuffle(train)
    rng.shuffle(held)
    if len(train) < spec.n_train or len(held) < spec.n_heldout:
        raise DataError(f"{spec.language}: {len(train)} training and {len(held)} held-out sentences available, "
                        f"asked for {spec.n_train} and {spec.n_heldout}")
    for split, texts, voices in (("train", train[: spec.n_train], spec.voices),
                                 ("heldout", held[: spec.n_heldout], spec.heldout_voices or spec.voices)):
        rows = []
        for i, text in enumerate(texts):
            voice = rng.choice(voices) + rng.choice(VARIANTS)
            speed, pitch = rng.randint(135, 185), rng.randint(30, 70)
            wav = espeak(text, voice, out / split / f"{i:05d}.wav", speed=speed, pitch=pitch)
            rows.append({"id": f"{split}-{i:05d}", "audio": str(wav.relative_to(out)), "text": text,
                         "language": spec.language, "voice": voice, "speed": speed, "pitch": pitch})
        write_manifest(manifests[split], rows)
    stamp.write_text(repr(spec))
    return manifests
