"""A user's mistake ends the ``chiasm`` command with exit code 2 and one line naming the culprit.

Each case runs the command in-process on a tiny saved model with one piece broken, and checks
the exit code, that stderr is exactly one ``chiasm: error:`` line naming the file, and that no
traceback is shown (``-v`` shows it; a bug keeps it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chiasm.cli import main
from chiasm.data.synthetic import WorldFiles
from chiasm.model import VisionLanguageModel


def _one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str], *named: object) -> str:
    """Run the command; assert exit code 2 and a single error line that names each of ``named``."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    # transformers draws a progress bar while it loads a model folder: not part of the error.
    lines = [line for line in err.strip().splitlines()
             if line.strip() and not line.startswith(("Loading weights", "Writing model"))]
    assert len(lines) == 1, err
    assert lines[0].startswith("chiasm: error: ")
    for thing in named:
        assert str(thing) in lines[0], (thing, lines[0])
    return lines[0]


def _chat(model: Path, image: Path, question: str = "What colour is the circle?") -> list[str]:
    return ["chat", "--model", str(model), "--image", str(image), "--max-new-tokens", "2", question]


# ---- a missing or corrupt model folder ----------------------------------------------------------
def test_folder_without_config(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    line = _one_error_line(_chat(folder, image), capsys, folder, "chiasm_config.json")
    assert "not a chiasm model folder" in line


def test_config_that_is_not_json(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (saved_model / "chiasm_config.json").write_text("{ not json")
    line = _one_error_line(_chat(saved_model, image), capsys, saved_model / "chiasm_config.json")
    assert "not a valid model config" in line


def test_config_with_an_unknown_key(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_model / "chiasm_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "colour": "red"}))
    _one_error_line(_chat(saved_model, image), capsys, path, "colour")


def test_truncated_bridge_weights(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_model / "bridge.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = _one_error_line(_chat(saved_model, image), capsys, path)
    assert "corrupt or truncated" in line


def test_encoder_weights_not_safetensors(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_model / "encoder.safetensors"
    path.write_text("these are not tensors")
    line = _one_error_line(_chat(saved_model, image), capsys, path)
    assert "not a readable safetensors file" in line


def test_missing_encoder_weights(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_model / "encoder.safetensors"
    path.unlink()
    line = _one_error_line(_chat(saved_model, image), capsys, path)
    assert "file missing" in line


def test_weights_of_another_model(saved_model: Path, image: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from safetensors.torch import save_file

    path = saved_model / "bridge.safetensors"
    save_file({"proj.weight": torch.zeros(2, 2)}, str(path))
    line = _one_error_line(_chat(saved_model, image), capsys, path)
    assert "do not fit the bridge" in line


def test_missing_lm_folder(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(saved_model / "lm")
    line = _one_error_line(_chat(saved_model, image), capsys, saved_model / "lm")
    assert "folder missing" in line


def test_corrupt_lm_weights(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (saved_model / "lm" / "model.safetensors").write_text("not tensors")
    _one_error_line(_chat(saved_model, image), capsys, saved_model / "lm")


# ---- chat and eval inputs --------------------------------------------------------------------
def test_missing_image(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.png"
    _one_error_line(_chat(saved_model, missing), capsys, missing, "image not found")


def test_image_that_is_a_folder(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_error_line(_chat(saved_model, tmp_path), capsys, tmp_path)


def test_empty_question_is_an_error(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(_chat(saved_model, image, ""), capsys, "the question is empty")
    assert "interactive" in line
    _one_error_line(_chat(saved_model, image, "   "), capsys, "the question is empty")


def test_placeholders_that_do_not_match_the_images(saved_model: Path, image: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(_chat(saved_model, image, "<image> <image> Which is bigger?"), capsys)
    assert line == ("chiasm: error: the question holds 2 <image> placeholder(s) but 1 image(s) were given; "
                    "give one --image per <image>, or leave the placeholders out")


def test_empty_eval_set_is_an_error(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "eval.json"
    data.write_text("[]\n")
    line = _one_error_line(["eval", "--model", str(saved_model), "--data", str(data), "--out", str(tmp_path / "o")],
                           capsys, data)
    assert "no samples to evaluate" in line
    assert not (tmp_path / "o" / "eval.json").exists()


def test_eval_max_samples_zero(saved_model: Path, tiny_world: WorldFiles, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(["eval", "--model", str(saved_model), "--data", str(tiny_world.eval),
                            "--max-samples", "0"], capsys, "max_samples")
    assert line == "chiasm: error: eval options: max_samples: must be >= 1, got 0"


def test_eval_data_that_is_not_json(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "eval.json"
    data.write_text("[{")
    _one_error_line(["eval", "--model", str(saved_model), "--data", str(data)], capsys, data, "malformed JSON")


def test_permission_denied_on_the_output_folder(saved_model: Path, tiny_world: WorldFiles, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # The tests may run as root, for whom file modes deny nothing: the OS's answer is simulated.
    out = tmp_path / "locked" / "eval"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:
        if self == out:
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    line = _one_error_line(["eval", "--model", str(saved_model), "--data", str(tiny_world.eval), "--max-samples",
                            "2", "--out", str(out)], capsys, out)
    assert line == (f"chiasm: error: Permission denied: {out}; "
                    "check its permissions, or choose a path this user may read or write")


def test_output_under_a_file(saved_model: Path, tiny_world: WorldFiles, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "eval"
    _one_error_line(["eval", "--model", str(saved_model), "--data", str(tiny_world.eval), "--max-samples", "2",
                     "--out", str(out)], capsys, out, "Not a directory")


# ---- config files ----------------------------------------------------------------------------
def test_config_file_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    line = _one_error_line(["train", "--config", str(path)], capsys, path)
    assert line == f"chiasm: error: config file not found: {path}"


def test_config_file_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(["train", "--config", str(tmp_path)], capsys, tmp_path)
    assert line == f"chiasm: error: {tmp_path} is a folder, not a config file"


def test_config_file_that_is_not_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[[stages]\nname = 'a'\n")
    line = _one_error_line(["train", "--config", str(path)], capsys, path)
    assert "not valid TOML" in line and "line 1" in line


def test_config_file_that_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.toml"
    path.write_text("seed = 1\n")
    real_read = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    line = _one_error_line(["train", "--config", str(path)], capsys, path)
    assert line.startswith("chiasm: error: Permission denied: ")


def test_empty_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.toml"
    path.write_text("")
    _one_error_line(["train", "--config", str(path)], capsys, path, "the config file is empty")


def test_config_with_several_problems_lists_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[[stages]]\nname = "a"\ndata = "a.json"\nlr = 0.0\nbatch_size = 0\n')
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"chiasm: error: {path}: 2 problems:", "  stages[0].batch_size: must be >= 1, got 0",
                                "  stages[0].lr: must be > 0, got 0.0"]


def _train_config(tmp_path: Path, lm_source: str, tiny_world: WorldFiles) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'output_dir = "{tmp_path / "run"}"\n[model.encoder]\nname = "tiny-vit"\nimage_size = 64\n'
                    f'options = {{ patch = 16, dim = 32 }}\n[model.lm]\nsource = "{lm_source}"\n'
                    f'[[stages]]\nname = "align"\ndata = "{tiny_world.align}"\nmax_steps = 1\n')
    return path


def test_lm_folder_in_the_config_missing(tmp_path: Path, tiny_world: WorldFiles,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-lm"
    line = _one_error_line(["train", "--config", str(_train_config(tmp_path, str(missing), tiny_world))],
                           capsys, missing)
    assert "folder not found" in line


def test_lm_folder_in_the_config_is_no_model(tmp_path: Path, tiny_world: WorldFiles,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "not-an-lm"
    folder.mkdir()
    line = _one_error_line(["train", "--config", str(_train_config(tmp_path, str(folder), tiny_world))],
                           capsys, folder)
    assert "cannot load it from this folder" in line


def test_lm_source_that_is_no_hub_id_either(tmp_path: Path, tiny_world: WorldFiles,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _one_error_line(["train", "--config", str(_train_config(tmp_path, "no such model", tiny_world))],
                    capsys, "'no such model'")


# ---- -v and real bugs ------------------------------------------------------------------------
def test_verbose_shows_the_traceback(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    assert main(["-v", *_chat(folder, image)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("chiasm: error: ")


def test_a_bug_keeps_its_traceback(saved_model: Path, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr("chiasm.chat.ask", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(_chat(saved_model, image))


def test_a_value_error_from_outside_chiasm_keeps_its_traceback(saved_model: Path, image: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import fractions

    def broken(*args, **kwargs):
        return fractions.Fraction("one half")  # a library's ValueError: chiasm passed it bad data, a bug

    monkeypatch.setattr("chiasm.chat.ask", broken)
    with pytest.raises(ValueError, match="Invalid literal for Fraction"):
        main(_chat(saved_model, image))


def test_unknown_packaged_lm(tmp_path: Path, tiny_world: WorldFiles, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(["train", "--config", str(_train_config(tmp_path, "packaged:nope", tiny_world))], capsys)
    assert line.startswith("chiasm: error: unknown packaged LM 'nope'; known: ")


# ---- other saved files: a processor config, a checkpoint -------------------------------------
def test_processor_config_that_is_not_json(saved_model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_model / "processor_config.json"
    path.write_text("{")
    line = _one_error_line(_chat(saved_model, image), capsys, path)
    assert "not valid JSON" in line


@pytest.mark.parametrize("name", ["model.safetensors", "rng.safetensors", "state.json"])
def test_resume_from_a_corrupt_checkpoint(name: str, tiny_lm_dir: Path, tiny_world: WorldFiles, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from chiasm.config import load_config
    from chiasm.train.trainer import Interrupted, Trainer

    path = _train_config(tmp_path, str(tiny_lm_dir), tiny_world)
    path.write_text(path.read_text().replace("max_steps = 1", "max_steps = 4\nbatch_size = 4\ncheckpoint_every = 1"))
    with pytest.raises(Interrupted):
        Trainer(load_config(path), show_progress=False).run(stop_after_steps=2)
    broken = tmp_path / "run" / "checkpoint" / name
    broken.write_bytes(broken.read_bytes()[:10])
    line = _one_error_line(["train", "--config", str(path), "--resume", "--no-eval"], capsys, broken)
    assert "unreadable checkpoint file" in line and "run without --resume" in line



def test_interactive_chat_says_what_is_wrong_with_a_line_and_goes_on(tiny_model: VisionLanguageModel, image: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from chiasm.chat import interactive

    lines = iter(["<image> <image> Which is bigger?", "What colour is the circle?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    interactive(tiny_model, [image])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == ("error: the question holds 2 <image> placeholder(s) but 1 image(s) were given; "
                      "give one --image per <image>, or leave the placeholders out")
    assert sum(line.startswith("model> ") for line in out) == 1


def test_interactive_chat_with_a_missing_image(saved_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def no_input(prompt: str = "") -> str:
        raise AssertionError("asked for a question before checking the image")

    monkeypatch.setattr("builtins.input", no_input)
    missing = tmp_path / "missing.png"
    _one_error_line(["chat", "--model", str(saved_model), "--image", str(missing)], capsys, missing)


def test_truncated_feature_cache_shard_is_named(tiny_model: VisionLanguageModel, image: Path, tmp_path: Path) -> None:
    from chiasm.errors import ModelFolderError
    from chiasm.features import FeatureCache

    FeatureCache.build(tiny_model.encoder, [str(image)], cache_dir=tmp_path, show_progress=False)
    (shard,) = tmp_path.glob("features-*/shard-*.npy")
    shard.write_bytes(shard.read_bytes()[:-64])
    again = FeatureCache.build(tiny_model.encoder, [str(image)], cache_dir=tmp_path, show_progress=False)
    with pytest.raises(ModelFolderError, match="unreadable feature cache shard") as info:
        again.lookup([str(image)])
    assert str(shard) in str(info.value) and f"delete {shard.parent} " in str(info.value)
