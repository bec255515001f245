"""A configured data set (:class:`SpeechData`) as samples: a manifest, a folder, or ``pocketsphinx``."""

from __future__ import annotations

from chiasm.speech.config import SpeechData
from chiasm.speech.manifest import SpeechSet, read_manifest

BUILTIN = "pocketsphinx"  # Debian's pocketsphinx-testdata recordings, read where the package puts them


def load_set(data: SpeechData, *, on_error: str = "raise") -> SpeechSet:
    if data.manifest == BUILTIN:
        from chiasm.speech.datasets import pocketsphinx_set

        s = pocketsphinx_set()
        s.samples = s.samples[: data.max_samples] if data.max_samples else s.samples
    else:
        s = read_manifest(data.manifest, on_error=on_error, language=data.language, max_samples=data.max_samples)
    s.name = data.name
    return s
