"""Audio reading, resampling, manifests and their bad input, labels, and WER against jiwer."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf

from chiasm.data.sample import DataError
from chiasm.speech.audio import chunks, load_audio, resample
from chiasm.speech.manifest import read_manifest
from chiasm.speech.metrics import error_rates, normalise, word_diff


def _tone(path: Path, rate: int, seconds: float, freq: float = 440.0) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t), rate)
    return path


def test_resampling_keeps_pitch_and_length(tmp_path: Path) -> None:
    audio = load_audio(_tone(tmp_path / "a.wav", 44100, 1.0))
    assert abs(len(audio) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 2


def test_stereo_is_averaged_and_raw_pcm_reads(tmp_path: Path) -> None:
    stereo = np.stack([np.full(1600, 0.5), np.full(1600, -0.1)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 16000)
    assert np.allclose(load_audio(tmp_path / "s.wav"), 0.2, atol=1e-3)
    (tmp_path / "r.raw").write_bytes((np.full(800, 8192, dtype="<i2")).tobytes())
    assert np.allclose(load_audio(tmp_path / "r.raw"), 0.25, atol=1e-4)


def test_bad_audio_is_named(tmp_path: Path) -> None:
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really")
    with pytest.raises(DataError, match=r"junk\.wav: unreadable audio"):
        load_audio(tmp_path / "junk.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(DataError, match=r"empty\.wav: empty audio"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(DataError, match=r"missing\.wav: audio file not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(DataError, match="sample rate 500 Hz cannot be resampled"):
        resample(np.zeros(100, dtype=np.float32), 500, name="x.wav")


def test_long_audio_windows_overlap() -> None:
    audio = np.arange(16000 * 65, dtype=np.float32)
    parts = chunks(audio, seconds=30, overlap=1)
    assert [len(p) for p in parts] == [480000, 480000, 16000 * 65 - 2 * 464000]
    assert parts[1][0] == 464000  # the second window starts 1 s before the first one ends


def test_manifest_errors_and_counted_skips(tmp_path: Path) -> None:
    _tone(tmp_path / "ok.wav", 22050, 0.5)
    _tone(tmp_path / "long.wav", 8000, 31.0)
    (tmp_path / "bad.wav").write_bytes(b"nope")
    rows = [{"audio": "ok.wav", "text": "hallo welt", "language": "de"},
            {"audio": "ok.wav", "text": "   ", "language": "de"},
            {"audio": "long.wav", "text": "too long", "language": "en"},
            {"audio": "bad.wav", "text": "broken", "language": "en"},
            {"audio": "ok.wav", "text": "Привет мир", "language": "de"},
            {"audio": "ok.wav", "text": "ok", "language": "klingon"}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"m\.jsonl:2: empty transcript"):
        read_manifest(m)
    s = read_manifest(m, on_error="skip")
    assert [x.text for x in s.samples] == ["hallo welt"] and len(s.skipped) == 5
    reasons = " | ".join(r for _, r in s.skipped)
    for expected in ("empty transcript", "31.0 s long", "bad.wav: unreadable audio", "not in a Latin script",
                     "unknown language 'klingon'"):
        assert expected in reasons


def test_folder_of_pairs(tmp_path: Path) -> None:
    _tone(tmp_path / "a.wav", 16000, 0.2)
    (tmp_path / "a.txt").write_text("one two\n")
    s = read_manifest(tmp_path, language="en")
    assert s.samples[0].text == "one two" and s.samples[0].language == "en"


def test_wer_matches_jiwer_on_normalised_text() -> None:
    refs = ["Mister Dashwood had then leisure.", "four queen of clubs"]
    hyps = ["Mr. Dashwood had leisure", "for Queen of Clothes."]
    r = error_rates(refs, hyps, "en")
    expected = jiwer.wer([normalise(x, "en") for x in refs], [normalise(x, "en") for x in hyps])
    assert r["wer"] == pytest.approx(expected)
    assert r["wer"] == pytest.approx(3 / 9)  # 9 words; "then" deleted, four->for, clubs->clothes; mister == mr
    assert normalise("Straße, sagte ER!", "de") == "straße sagte er"
    diff = word_diff("four queen of clubs", "for queen of clothes", "en")
    assert diff[0] == ("substitute", "4", "for") and diff[1][0] == "equal"  # the normaliser writes digits


def test_labels_mask_the_prompt_and_use_language_tokens() -> None:
    from chiasm.speech.batches import IGNORE, label_sequence
    from chiasm.speech.tiny import tiny_whisper

    try:
        w = tiny_whisper("base")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    tok = w.tokenizer
    inputs, labels = label_sequence(w, "Guten Tag", "de", "transcribe", "x")
    prompt = [tok.convert_tokens_to_ids(t) for t in
              ("<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>")]
    assert inputs[:4] == prompt
    assert labels[:3] == [IGNORE] * 3  # predicting <|de|>, <|transcribe|>, <|notimestamps|> is not trained
    assert tok.decode(labels[3:-1]) == " Guten Tag" and labels[-1] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert len(inputs) == len(labels)
    with pytest.raises(ValueError, match="unknown language"):
        label_sequence(w, "x", "elvish", "transcribe", "x")


def test_english_only_model_refuses_other_languages() -> None:
    from chiasm.speech.tiny import tiny_whisper
    from chiasm.speech.tokens import decoder_prompt

    try:
        w = tiny_whisper("tiny.en")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert len(decoder_prompt(w.tokenizer, "en")) == 2
    with pytest.raises(ValueError, match="English-only"):
        decoder_prompt(w.tokenizer, "de")


@pytest.mark.parametrize("packaged,language", [("base", "de"), ("tiny.en", None)])
def test_generation_equals_a_greedy_loop_over_the_prompt(packaged: str, language: str | None) -> None:
    """generate (as transcribe calls it) must decode after exactly the prompt the labels are trained with."""
    import torch

    from chiasm.speech.tiny import tiny_whisper
    from chiasm.speech.tokens import decoder_prompt
    from chiasm.speech.transcribe import features, generate_ids

    try:
        w = tiny_whisper(packaged, d_model=32, layers=1, heads=2, seed=5)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    audio = np.random.default_rng(1).standard_normal(8000).astype(np.float32) * 0.1
    feats = features(w, [audio])
    ids = decoder_prompt(w.tokenizer, language)
    eot = w.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    steps = 8
    with torch.no_grad():
        for i in range(steps):
            logits = w.model(input_features=feats, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            if i == 0:
                logits[[220, eot]] = -float("inf")  # begin_suppress_tokens
            ids.append(int(logits.argmax()))
    expected = [t for t in ids[len(decoder_prompt(w.tokenizer, language)):] if t < eot]
    got = generate_ids(w, feats, language=language, max_new_tokens=steps)[0]
    assert got == expected[: len(got)] and len(got) >= min(len(expected), steps - 1)
