"""``input_audio`` content parts: a model that hears answers spoken questions through the OpenAI API."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from serving.helpers import MODEL, client, data_url, png_bytes, post_json

from chiasm.config import AudioConfig, BridgeConfig
from chiasm.data.sample import Turn
from chiasm.generation import Engine, Request, SamplingParams
from chiasm.model import VisionLanguageModel
from chiasm.serve.app import create_app
from chiasm.serve.background import BackgroundServer
from chiasm.serve.settings import ServeSettings
from chiasm.speech.audio import resample
from chiasm.speech.loader import save_whisper
from chiasm.speech.tiny import tiny_whisper


def _wav_bytes(seconds: float, freq: float, rate: int = 22_050) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


@pytest.fixture(scope="module")
def hearing_dir(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import tiny_config

    root = tmp_path_factory.mktemp("hearing")
    whisper = save_whisper(tiny_whisper(d_model=16), root / "whisper")
    cfg = replace(tiny_config(tiny_lm_dir), audio=AudioConfig(str(whisper), 1.0, BridgeConfig("pooling",
                                                                                              {"kernel": [1, 10]})))
    torch.manual_seed(0)
    return VisionLanguageModel.build(cfg).save(root / "model")


@pytest.fixture(scope="module")
def served(hearing_dir: Path):
    settings = ServeSettings(model_name=MODEL, max_batch_size=2, batch_wait_ms=20, default_max_tokens=8)
    with BackgroundServer(create_app(hearing_dir, settings)) as server:
        yield server


def test_a_spoken_question_is_answered_as_the_engine_answers_it(served, hearing_dir: Path) -> None:
    clip = _wav_bytes(0.6, 500.0)
    reply = client(served.url).chat.completions.create(
        model=MODEL, max_tokens=6, temperature=1.0, seed=5,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                                               _audio_part(clip)]}])
    engine = Engine(VisionLanguageModel.load(hearing_dir))
    samples, rate = sf.read(io.BytesIO(clip), dtype="float32")
    image = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    want = engine.generate([Request([Turn("human", "<image>\n<audio>")], [image],
                                    SamplingParams(max_new_tokens=6, temperature=1.0, seed=5),
                                    [resample(samples, rate)])])[0]
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == want.prompt_tokens and want.prompt_tokens > 16 + 5


@pytest.mark.parametrize(("part", "message"), [
    ({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}, "not valid base64"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}, "format must be one of"),
    ({"type": "input_audio", "input_audio": "x"}, "must be an object with a base64 'data'"),
    (_audio_part(b"RIFF0000WAVEjunk"), "cannot decode the wav audio"),
    (_audio_part(_wav_bytes(1.5, 300.0)), "1.50 s of audio; this model hears at most 1 s"),
])
def test_bad_audio_is_a_400_naming_the_part(served, part: dict, message: str) -> None:
    reply = post_json(served.url, {"model": MODEL, "messages": [{"role": "user", "content": [part]}]})
    assert reply.status == 400 and message in reply.error, reply.body
    # The server is still up and answers the next request.
    ok = post_json(served.url, {"model": MODEL, "messages": [{"role": "user",
                                                            "content": [_audio_part(_wav_bytes(0.3, 400))]}]})
    assert ok.status == 200


def test_a_model_that_does_not_hear_refuses_audio(saved_model_dir: Path) -> None:
    settings = ServeSettings(model_name=MODEL, default_max_tokens=4)
    with BackgroundServer(create_app(saved_model_dir, settings)) as server:
        reply = post_json(server.url, {
            "model": MODEL, "messages": [{"role": "user", "content": [_audio_part(_wav_bytes(0.3, 400))]}]})
    assert reply.status == 400 and "does not hear" in reply.error
