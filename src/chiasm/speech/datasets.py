"""The offline speech data sets: real English recordings from Debian's pocketsphinx-testdata.

(The synthetic espeak-ng sets are built by :mod:`chiasm.speech.synthetic`.)
"""

from __future__ import annotations

import re
from pathlib import Path

from chiasm.data.sample import DataError
from chiasm.speech.manifest import SpeechSample, SpeechSet, check_audio

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
_LINE = re.compile(r"^\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()]+)\)\s*$")


def _transcripts(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(2)] = m.group(1)
    return out


def pocketsphinx_set(root: Path = POCKETSPHINX) -> SpeechSet:
    """The 10 transcribed recordings (5 LibriVox read speech, 5 card names), 16 kHz WAV."""
    if not root.is_dir():
        raise DataError(f"{root}: Debian's pocketsphinx-testdata is not installed (apt-get install "
                        "pocketsphinx-testdata; scripts/setup.sh does it where it runs as root)")
    samples = []
    for folder, tfile in (("librivox", "transcription"), ("cards", "cards.transcription")):
        for sid, text in _transcripts(root / folder / tfile).items():
            s = SpeechSample(f"{folder}/{sid}", root / folder / f"{sid}.wav", text, "en")
            check_audio(s, str(s.audio_path))
            samples.append(s)
    return SpeechSet("pocketsphinx", samples)
