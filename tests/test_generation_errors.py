"""Bad requests are refused with one clear line before any model work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from chiasm.data.sample import Turn
from chiasm.generation import Engine, Request, RequestError, SamplingParams
from chiasm.model import VisionLanguageModel

ASK = [Turn("human", "<image>\nWhat colour is the circle?")]


@pytest.fixture
def engine(tiny_model: VisionLanguageModel) -> Engine:
    return Engine(tiny_model)


@pytest.mark.parametrize(("params", "message"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    ({"temperature": -0.1}, "temperature must be a finite number >= 0 (0: greedy), got -0.1"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0 (0: greedy), got nan"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -1}, "top_k must be an integer >= 0 (0: off), got -1"),
    ({"seed": -3}, "seed must be an integer in [0, 2**63) or None, got -3"),
    ({"seed": "7"}, "seed must be an integer in [0, 2**63) or None, got '7'"),
    ({"stop": ["ok", ""]}, "stop must be a list of non-empty strings, got ['ok', '']"),
    ({"stop": "ok"}, "stop must be a list of non-empty strings, got 'ok'"),
])
def test_bad_sampling_values(engine: Engine, image: Path, params: dict, message: str) -> None:
    with pytest.raises(RequestError) as info:
        engine.validate(Request(ASK, [image], SamplingParams(**params)))
    assert str(info.value) == message


def test_placeholders_and_images_must_match(engine: Engine, image: Path) -> None:
    with pytest.raises(RequestError, match=r"^the conversation holds 1 <image> placeholder\(s\) but 2 image\(s\) "
                                           r"were given; give one image per placeholder$"):
        engine.validate(Request(ASK, [image, image]))
    with pytest.raises(RequestError, match=r"holds 0 <image> placeholder\(s\) but 1 image"):
        engine.validate(Request([Turn("human", "hi")], [image]))


def test_conversation_shape(engine: Engine) -> None:
    with pytest.raises(RequestError, match=r"^the conversation is empty; it must end with a 'human' turn$"):
        engine.validate(Request([], []))
    with pytest.raises(RequestError, match=r"^the conversation must end with a 'human' turn, not 'gpt'$"):
        engine.validate(Request([Turn("human", "hi"), Turn("gpt", "hello")], []))
    with pytest.raises(RequestError, match=r"^turn 1 is not a Turn with a role in \('system', 'human', 'gpt'\)"):
        engine.validate(Request([Turn("user", "hi")], []))  # type: ignore[arg-type]


def test_unreadable_images(engine: Engine, tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(RequestError, match=f"^image 1: image not found: {re.escape(str(missing))}$"):
        engine.validate(Request(ASK, [missing]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(RequestError, match=f"^image 1: .*{re.escape(broken.name)}"):
        engine.validate(Request(ASK, [broken]))
    with pytest.raises(RequestError, match=r"^image 1: expected a PIL image or a file path, got bytes$"):
        engine.validate(Request(ASK, [b"\x89PNG"]))  # type: ignore[list-item]


def test_truncated_image_in_memory(engine: Engine, image: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.png"
    data = image.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    lazy = Image.open(cut)  # opens from the header; the pixels fail only when decoded
    with pytest.raises(RequestError, match=r"^image 1: cannot decode the picture"):
        engine.validate(Request(ASK, [lazy]))


def test_prompt_and_new_tokens_must_fit_the_context(engine: Engine, image: Path) -> None:
    context = engine.model.max_length
    with pytest.raises(RequestError, match=rf"^the prompt's (\d+) tokens \+ max_new_tokens {context} = \d+ exceed "
                                           rf"the model's context of {context} tokens; lower max_new_tokens or "
                                           "shorten the conversation$"):
        engine.validate(Request(ASK, [image], SamplingParams(max_new_tokens=context)))
    long = [Turn("human", "<image>\n" + "the quick brown fox " * 200)]
    with pytest.raises(RequestError, match=r"exceeds the LM's maximum of \d+"):
        engine.validate(Request(long, [image]))


def test_a_bad_request_in_a_batch_stops_it_before_the_model_runs(engine: Engine, image: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(engine.model, "encode_images", lambda *a, **k: calls.append(1))
    good = Request(ASK, [image])
    bad = Request(ASK, [image], SamplingParams(top_k=-2))
    with pytest.raises(RequestError, match="top_k"):
        next(engine.stream([good, bad]))
    assert calls == []
    assert issubclass(RequestError, ValueError)
