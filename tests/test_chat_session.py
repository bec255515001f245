"""The multi-turn terminal chat: streamed answers, images attached mid-conversation, errors that keep the session."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chiasm.chat import ChatSession, ask, interactive
from chiasm.cli import main
from chiasm.data.sample import Turn
from chiasm.generation import Engine, Request, SamplingParams
from chiasm.model import VisionLanguageModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(spread_model: VisionLanguageModel, tmp_path: Path) -> Path:
    return spread_model.save(tmp_path / "model")


def _answers(out: str) -> list[str]:
    """The answers printed after ``model> `` (a prompt read from a pipe is printed on the same line)."""
    return [line.split("model> ", 1)[1] for line in out.splitlines() if "model> " in line]


def test_session_keeps_turns_and_images_in_order(spread_model: VisionLanguageModel, eval_images: list[Path]) -> None:
    session = ChatSession(spread_model, SamplingParams(max_new_tokens=6))
    session.attach(eval_images[0])
    first = "".join(session.answer("What colour is the circle?")).strip()
    session.attach(eval_images[1])
    second = "".join(session.answer("And in this one?")).strip()
    assert [t.role for t in session.history] == ["human", "gpt", "human", "gpt"]
    assert session.history[0].text == "<image>\nWhat colour is the circle?"
    assert session.history[2].text == "<image>\nAnd in this one?"
    assert len(session.images) == 2 and session.pending == []
    # Each streamed answer is the engine's answer to the whole conversation so far.
    assert first == ask(spread_model, "What colour is the circle?", [eval_images[0]], max_new_tokens=6)
    request = Request(session.history[:3], eval_images[:2], SamplingParams(max_new_tokens=6))
    expected = Engine(spread_model).generate([request])
    assert second == expected[0].text.strip()
    session.reset()
    assert session.history == [] and session.images == []


def test_a_refused_question_leaves_the_conversation_as_it_was(spread_model: VisionLanguageModel,
                                                              eval_images: list[Path]) -> None:
    session = ChatSession(spread_model, SamplingParams(max_new_tokens=4))
    session.attach(eval_images[0])
    with pytest.raises(ValueError, match="holds 2 <image> placeholder"):
        list(session.answer("<image> <image> which?"))
    assert session.history == [] and len(session.pending) == 1
    long = "the quick brown fox " * 200
    with pytest.raises(ValueError, match="exceeds the LM's maximum"):
        list(session.answer(long))
    assert session.history == [] and len(session.pending) == 1


def test_repl_streams_answers_and_survives_bad_lines(spread_model: VisionLanguageModel, eval_images: list[Path],
                                                     tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    lines = iter(["What colour is the circle?", f"/image {missing}", "/image", "/frobnicate",
                  f"/image {eval_images[1]}", "And here?", "/quit", "never read"])
    pieces: list[str] = []

    class Terminal(io.StringIO):
        def write(self, s: str) -> int:
            pieces.append(s)
            return super().write(s)

    out = Terminal()
    interactive(spread_model, [eval_images[0]], SamplingParams(max_new_tokens=6), read=lambda prompt: next(lines),
                out=out)
    text = out.getvalue().splitlines()
    assert f"error: image not found: {missing}" in text
    assert "error: /image needs a path, e.g. /image photos/cat.jpg" in text
    assert any(line.startswith("error: unknown command /frobnicate") for line in text)
    assert f"attached {eval_images[1]} to the next question" in text
    answers = _answers(out.getvalue())
    assert len(answers) == 2
    conversation = [Turn("human", "<image>\nWhat colour is the circle?"), Turn("gpt", answers[0]),
                    Turn("human", "<image>\nAnd here?")]
    expected = Engine(spread_model).generate([Request(conversation, eval_images[:2], SamplingParams(max_new_tokens=6))])
    assert answers[1] == expected[0].text.strip()
    assert all(answers)
    # Streamed: the answer reached the terminal in several writes, not as one line.
    assert len(pieces) > 2 * len(answers) + len(text)


def test_ctrl_c_stops_the_answer_not_the_session(spread_model: VisionLanguageModel,
                                                 eval_images: list[Path]) -> None:
    lines = iter(["What colour is the circle?", "Name a colour.", ""])
    interrupted = []

    class Terminal(io.StringIO):
        def write(self, s: str) -> int:
            if s.startswith("model> ") and not interrupted:
                interrupted.append(s)
                raise KeyboardInterrupt
            return super().write(s)

    out = Terminal()
    session_params = SamplingParams(max_new_tokens=5)
    interactive(spread_model, [eval_images[0]], session_params, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "[answer interrupted; it is left out of the conversation]" in text
    assert text.count("model> ") == 1
    # The interrupted turn is not in the conversation: the second answer is the one to the second question alone.
    request = Request([Turn("human", "<image>\nName a colour.")], eval_images[:1], session_params)
    assert "model> " + Engine(spread_model).generate([request])[0].text.strip() + "\n" in text


def test_cli_session_from_stdin(saved: Path, eval_images: list[Path], monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    feed = f"What colour is the circle?\n/image {eval_images[1]}\nAnd here?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(feed))
    assert main(["chat", str(saved), "--image", str(eval_images[0]), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    answers = _answers(out)
    assert len(answers) == 2
    spread_model = VisionLanguageModel.load(saved)
    assert answers[0] == ask(spread_model, "What colour is the circle?", [eval_images[0]], max_new_tokens=5)


def test_cli_sampling_flags_repeat_with_a_seed(saved: Path, image: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = ["chat", str(saved), "--image", str(image), "--temperature", "1.5", "--top-k", "50",
            "--top-p", "0.9", "--seed", "11", "--max-new-tokens", "6", "What is this?"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    spread_model = VisionLanguageModel.load(saved)
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=50, top_p=0.9, seed=11)
    assert first == ask(spread_model, "What is this?", [image], params=params) + "\n"


@pytest.mark.parametrize(("flag", "message"), [
    (["--top-p", "0"], "chat option: top_p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "chat option: temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--max-new-tokens", "0"], "chat option: max_new_tokens must be an integer >= 1, got 0"),
])
def test_cli_bad_sampling_flag_fails_before_loading(tmp_path: Path, image: Path, flag: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # The model folder does not exist: the flag is refused first.
    assert main(["chat", str(tmp_path / "no-model"), "--image", str(image), *flag, "hi"]) == 2
    assert capsys.readouterr().err == f"chiasm: error: {message}\n"


def test_cli_needs_a_model_and_one_question(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--image", str(image)]) == 2
    assert "chat needs a model folder" in capsys.readouterr().err
    assert main(["chat", "--model", "m", "two", "questions"]) == 2
    assert "chat takes one question (quote it)" in capsys.readouterr().err


def test_chat_command_reads_real_stdin(saved: Path, image: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "chiasm.cli", "chat", str(saved), "--image", str(image),
                           "--max-new-tokens", "4"], input="What is this?\nAnd now?\n", env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = _answers(proc.stdout)
    assert len(answers) == 2 and all(answers)
