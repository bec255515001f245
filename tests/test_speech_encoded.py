"""Evaluation clips' encoder outputs kept between transcriptions: the same transcripts, no second
encoder pass while the encoder is unchanged, nothing stale once it changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chiasm.speech.transcribe import EncoderOutputs, transcribe


def _whisper():
    from chiasm.speech.tiny import tiny_whisper

    try:
        return tiny_whisper("base", d_model=32, layers=1, heads=2, seed=1)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _clips() -> list[np.ndarray]:
    t = np.arange(8000) / 16000
    return [(0.2 * np.sin(2 * np.pi * f * t)).astype(np.float32) for f in (220, 330, 440)]


def test_kept_encoder_outputs_give_the_same_transcripts_without_encoding_again() -> None:
    w = _whisper()
    clips = _clips()
    plain = transcribe(w, clips, language="de", max_new_tokens=8, batch_size=2)
    calls = []
    hook = w.model.model.encoder.register_forward_hook(lambda *_: calls.append(1))
    kept = EncoderOutputs()
    kept.bind(w)
    first = transcribe(w, clips, language="de", max_new_tokens=8, batch_size=2, encoded=kept)
    n_first = len(calls)
    again = transcribe(w, clips, language="de", max_new_tokens=8, batch_size=2, encoded=kept)
    hook.remove()
    assert first == plain and again == plain
    assert n_first == 2 and len(calls) == n_first  # two batches encoded once; the second pass none
    assert len(kept.rows) == 3


def test_a_changed_encoder_drops_the_kept_rows() -> None:
    w = _whisper()
    kept = EncoderOutputs()
    kept.bind(w)
    transcribe(w, _clips(), language="de", max_new_tokens=4, encoded=kept)
    kept.bind(w)  # unchanged weights: rows stay
    assert len(kept.rows) == 3
    with torch.no_grad():
        w.model.model.encoder.layers[0].fc1.weight.add_(1e-3)
    kept.bind(w)
    assert kept.rows == {}
    small = EncoderOutputs(max_bytes=1)  # nothing fits: every window encoded each time, still answered
    small.bind(w)
    assert transcribe(w, _clips(), language="de", max_new_tokens=4, encoded=small) == \
        transcribe(w, _clips(), language="de", max_new_tokens=4)
    assert small.rows == {}
