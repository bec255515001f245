"""``input_audio`` content parts (OpenAI's schema: base64 data and a format) -> 16 kHz mono samples.

The clip is decoded by soundfile from memory (WAV, FLAC, OGG/Vorbis, Opus; MP3 where the
system's libsndfile reads it) and resampled like training audio; anything it cannot read, an
empty clip or a broken sample rate is a 400 that names the part. Length against the model's
window is checked by the engine, which knows the window.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from chiasm.data.sample import DataError
from chiasm.serve.errors import bad_request
from chiasm.speech.audio import mono_16k

FORMATS = ("wav", "flac", "ogg", "mp3")


def decode_input_audio(data: str, fmt: str, *, where: str, max_bytes: int) -> np.ndarray:
    """Base64 ``data`` in ``fmt`` -> mono float32 at 16 kHz; ``where`` names the part in errors."""
    import soundfile as sf

    param = f"{where}.input_audio.data"
    if len(data) > max_bytes * 4 // 3 + 4:
        raise bad_request(f"{param}: the clip is over this server's limit of {max_bytes} bytes", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64", param) from None
    try:
        samples, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise bad_request(f"{where}: cannot decode the {fmt} audio ({exc})", param) from None
    try:
        return mono_16k(samples, int(rate), where)
    except DataError as exc:  # empty, NaN or infinite samples, a sample rate that cannot be real
        raise bad_request(str(exc), param) from None
