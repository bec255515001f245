"""The bad-input corpus (``tests/badinput/cases.py``) run through ``chiasm train``, ``eval`` and ``chat``.

For each case: exit code 2 with one ``chiasm: error:`` line naming the offending file and sample,
no traceback, and nothing half-written (no model folder, checkpoint or eval output left by a run
that failed); a training case under ``on_error = "skip"`` exits 0 with the sample recorded as
skipped in the run folder; an unusual but valid input (a 16-bit PNG, unknown record keys) succeeds.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from badinput.cases import CASES, CLASSES, Case
from badinput.env import Env

from chiasm.cli import main
from chiasm.model import VisionLanguageModel


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path) -> Path:
    import torch

    from chiasm.config import BridgeConfig, EncoderConfig, LMConfig, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(encoder=EncoderConfig(name="tiny-vit", image_size=64, options={"patch": 16, "dim": 32}),
                      bridge=BridgeConfig(name="mlp"), lm=LMConfig(source=str(tiny_lm_dir)))
    return VisionLanguageModel.build(cfg).save(tmp_path_factory.mktemp("bad-inputs") / "model")


@pytest.fixture(scope="module")
def good_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("bad-inputs-image") / "img.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


def _skip_entries(run_dir: Path) -> list[str]:
    """Every line of the skip records a run wrote under ``RUN/stages/*`` (JSON list or JSONL)."""
    text = []
    for path in sorted((run_dir / "stages").glob("*/skipped.json*")):
        text.append(path.read_text())
    return text


def _error_lines(err: str) -> list[str]:
    # transformers draws a progress bar while it loads a model folder: not part of the error.
    return [line for line in err.strip().splitlines()
            if line.strip() and not line.startswith(("Loading weights", "Writing model"))]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, tmp_path: Path, tiny_lm_dir: Path, saved_model: Path, good_image: Path,
                   capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    c: Case = CASES[name]
    env = Env(tmp_path / "case", tiny_lm_dir, saved_model, good_image)
    env.root.mkdir()
    expect = c.make(env)
    assert expect.argv[0] == c.command
    if expect.before_model:
        def no_model(*args: object, **kwargs: object) -> None:
            pytest.fail("a model was built or loaded before the error was found")

        monkeypatch.setattr(VisionLanguageModel, "build", classmethod(no_model))
        monkeypatch.setattr(VisionLanguageModel, "load", classmethod(no_model))
    with caplog.at_level(logging.WARNING):
        rc = main(expect.argv)  # a traceback would propagate out of main and fail the test here
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    if expect.ok or expect.skipped:
        assert rc == 0, f"exit code {rc}: {_error_lines(err)}"
        if expect.verify is not None:
            expect.verify()
        if expect.skipped:
            entries = _skip_entries(env.run_dir)
            assert entries, f"no skip record under {env.run_dir / 'stages'}"
            assert any(expect.sample in e for e in entries), (expect.sample, entries)
            assert (env.run_dir / "model").is_dir()
        return
    assert rc == 2, f"exit code {rc}, expected 2; stderr: {_error_lines(err)}"
    # Progress bars share stderr (and, ending in a carriage return, the error's line): the error is the tail.
    assert err.count("chiasm: error: ") == 1, err
    message = err[err.index("chiasm: error: "):].rstrip()
    rest = message.splitlines()[1:]
    assert all(line.startswith("  ") for line in rest), message  # only a config's list of problems wraps
    for thing in expect.named:
        assert thing in message, (thing, message)
    if expect.sample is not None:
        assert f"sample {expect.sample!r}" in message, (expect.sample, message)
    for path in expect.absent:
        assert not path.exists(), f"a failed run left {path}"


def test_corpus_covers_every_class_with_80_cases(capsys: pytest.CaptureFixture[str]) -> None:
    per_class = Counter(c.cls for c in CASES.values())
    per_command = Counter(c.command for c in CASES.values())
    summary = {"total": len(CASES), "per_class": dict(per_class), "per_command": dict(per_command)}
    with capsys.disabled():
        print("\nbad-input corpus:", json.dumps(summary))
    assert len(CASES) >= 80
    assert set(per_class) == set(CLASSES)
    assert set(per_command) == {"train", "eval", "chat"}
    assert min(per_class.values()) >= 10
