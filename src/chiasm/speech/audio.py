"""Reading audio as 16 kHz mono float32, with errors that name the file.

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis, Opus and headerless raw PCM with no
FFmpeg and no torch-version coupling (torchaudio's wheels track one torch release each and
moved their I/O to torchcodec; librosa pulls numba and scipy for what is here a read and a
resample). soxr, the SoX resampler as a small wheel, does the rate conversion: band-limited,
high quality, and fast enough to resample a whole data set on the fly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chiasm.data.sample import DataError

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # Whisper's window: longer audio is chunked (transcribe) or refused (training)
MIN_RATE, MAX_RATE = 1_000, 384_000  # outside this a "sample rate" is a broken header, not audio


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE, *, name: str = "audio") -> np.ndarray:
    """``audio`` (mono float32) at ``target`` Hz; a rate that cannot be real is refused, naming ``name``."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise DataError(f"{name}: sample rate {rate} Hz cannot be resampled (expected {MIN_RATE}-{MAX_RATE} Hz)")
    if rate == target:
        return audio.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(audio, rate, target, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | Path, *, raw_rate: int | None = None) -> np.ndarray:
    """Mono float32 samples at 16 kHz from a file soundfile reads.

    ``raw_rate``: headerless 16-bit PCM (``.raw``/``.pcm``, as pocketsphinx ships) at that rate.
    Unreadable, empty or silent-length files are refused with the file's name.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: audio file not found" if not path.is_dir() else f"{path}: a folder, not audio")
    try:
        if raw_rate is not None or path.suffix.lower() in (".raw", ".pcm"):
            rate = raw_rate or SAMPLE_RATE
            data, rate = sf.read(str(path), dtype="float32", samplerate=rate, channels=1, subtype="PCM_16",
                                 format="RAW", always_2d=True)
        else:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: unreadable audio ({exc})") from None
    return mono_16k(data, int(rate), str(path))


def mono_16k(data: np.ndarray, rate: int, name: str) -> np.ndarray:
    """Decoded ``(samples, channels)`` audio -> mono float32 at 16 kHz; empty, non-finite or
    unresamplable audio is a DataError naming ``name`` (a file, or a part of a request)."""
    if data.size == 0 or data.shape[0] == 0:
        raise DataError(f"{name}: empty audio (no samples)")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise DataError(f"{name}: audio holds NaN or infinite samples")
    return resample(mono, rate, name=name)


def duration(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    return len(audio) / rate


def chunks(audio: np.ndarray, *, seconds: float = MAX_SECONDS, overlap: float = 1.0,
           rate: int = SAMPLE_RATE) -> list[np.ndarray]:
    """Windows of at most ``seconds`` that overlap by ``overlap`` seconds (one window if it fits).

    The overlap keeps a word cut at a boundary whole in one of the two windows; the
    transcripts are joined with the repeated words at the seam removed (see transcribe).
    """
    size, step = int(seconds * rate), int((seconds - overlap) * rate)
    if len(audio) <= size:
        return [audio]
    out, start = [], 0
    while True:
        out.append(audio[start : start + size])
        if start + size >= len(audio):
            return out
        start += step
