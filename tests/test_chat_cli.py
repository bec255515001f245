"""``chiasm.chat.ask`` and the ``chiasm`` command on a saved tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chiasm.chat import ask
from chiasm.cli import main
from chiasm.data.sample import DataError, Turn
from chiasm.model import VisionLanguageModel
from chiasm.synthetic.world import WorldFiles


def test_ask_returns_a_string(saved_model: Path, image: Path) -> None:
    model = VisionLanguageModel.load(saved_model)
    answer = ask(model, "What colour is the circle?", [image], max_new_tokens=4)
    assert isinstance(answer, str)
    assert answer == answer.strip()
    # Greedy decoding: the same question gives the same answer, with or without an explicit placeholder.
    assert ask(model, "What colour is the circle?", [image], max_new_tokens=4) == answer
    assert ask(model, "<image>\nWhat colour is the circle?", [image], max_new_tokens=4) == answer


def test_ask_with_history_and_without_images(saved_model: Path, image: Path) -> None:
    model = VisionLanguageModel.load(saved_model)
    history = [Turn("human", "<image>\nWhat colour is the circle?"), Turn("gpt", "red")]
    assert isinstance(ask(model, "Where is it?", [image], history=history, max_new_tokens=3), str)
    assert isinstance(ask(model, "Name a colour.", [], max_new_tokens=3), str)


def test_ask_missing_image_names_the_path(saved_model: Path, tmp_path: Path) -> None:
    model = VisionLanguageModel.load(saved_model)
    missing = tmp_path / "nowhere" / "cat.png"
    with pytest.raises(DataError, match="image not found") as info:
        ask(model, "What is this?", [missing])
    assert str(missing) in str(info.value)


def test_cli_chat_missing_model_folder(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    rc = main(["chat", "--model", str(missing), "--image", str(image), "What is this?"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("chiasm: error:")
    assert str(missing) in err and "not a chiasm model folder" in err
    assert "Traceback" not in err


def test_cli_chat_missing_image(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.png"
    rc = main(["chat", "--model", str(saved_model), "--image", str(missing), "What is this?"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "chiasm: error:" in err and str(missing) in err


def test_cli_chat_answers(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["chat", "--model", str(saved_model), "--image", str(image), "--max-new-tokens", "3",
               "What colour is the circle?"])
    assert rc == 0
    model = VisionLanguageModel.load(saved_model)
    expected = ask(model, "What colour is the circle?", [image], max_new_tokens=3)
    assert capsys.readouterr().out == expected + "\n"


def test_cli_eval_writes_results(saved_model: Path, tiny_world: WorldFiles, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(saved_model), "--data", str(tiny_world.eval), "--max-samples", "5",
               "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "eval.json").read_text())
    assert {"vqa", "blank", "retention", "chance", "reliance"} <= set(results)
    assert results["vqa"]["n"] == 5 and results["blank"]["n"] == 5
    assert 0.0 <= results["vqa"]["overall"] <= 1.0 and 0.0 <= results["blank"]["overall"] <= 1.0
    retention = results["retention"]
    assert retention["base_ppl"] > 1 and retention["model_ppl"] > 1
    # The saved model's LM is the unchanged tiny LM: it retains everything.
    assert retention["ppl_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert retention["unchanged_share"] == 1.0
    assert len(results["samples"]) == 5
    stdout = capsys.readouterr().out
    report = Path(stdout.split("report: ")[-1].strip())
    assert report.is_file() and report.parent == out


def test_cli_eval_missing_data(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(saved_model), "--data", str(missing), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err


def test_interactive_chat_keeps_the_image_in_the_conversation(tiny_model, tiny_world, monkeypatch, capsys) -> None:
    from chiasm.chat import interactive

    image = next((tiny_world.image_dir / "eval").glob("*.png"))
    lines = iter(["How many objects are there?", "What colour is the circle?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    interactive(tiny_model, [image])
    out = capsys.readouterr().out
    assert out.count("model>") == 2  # two answers, then the empty line ends the session
