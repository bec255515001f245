"""Talk to a saved model (``chiasm chat``): one question, or a multi-turn terminal session.

Both go through the generation engine (``chiasm.generation``), so the terminal, the server
and evaluation answer alike. In a session, every question and answer stays in the
conversation; images are attached at the start (``--image``) or mid-conversation
(``/image PATH``) and go before the next question, or where that question puts its
``<image>`` placeholders. A bad line (a missing image, placeholders that do not match, a
conversation grown past the model's context) is reported and the session goes on, and
Ctrl-C while an answer streams stops that answer only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from chiasm.data.images import load_image
from chiasm.data.sample import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, DataError, Turn
from chiasm.generation import Engine, Request, RequestError, SamplingParams
from chiasm.model import VisionLanguageModel

HELP = ("commands: /image PATH attaches an image to the next question, /reset starts over, /help, "
        "/quit (or an empty line, or Ctrl-D) ends")


@torch.no_grad()
def ask(model: VisionLanguageModel, question: str, images: list[Path], *, history: list[Turn] | None = None,
        max_new_tokens: int = 64, params: SamplingParams | None = None, audios: list[Path] | None = None) -> str:
    """One whole answer, greedy unless ``params`` say otherwise.

    Images go where ``<image>`` stands, or before the question if there is no placeholder. Audio
    clips (a model that hears) go after the images; with clips the typed question may be empty:
    the question is then the spoken one.
    """
    audios = list(audios or [])
    if audios and not question.strip():
        question = "\n".join([AUDIO_PLACEHOLDER] * len(audios))
    elif audios and AUDIO_PLACEHOLDER not in question:
        question = "\n".join([AUDIO_PLACEHOLDER] * len(audios) + [question])
    check_question(question, len(images), history)
    # Decoded here, so a missing or corrupt file fails naming its path, and handed to the engine
    # decoded, so it is not read twice.
    pictures = [load_image(Path(img), sample_id="chat", source="<chat>") for img in images]
    text = question
    if images and IMAGE_PLACEHOLDER not in question and not any(IMAGE_PLACEHOLDER in t.text for t in history or []):
        text = _with_placeholders(question, len(images))
    params = params or SamplingParams(max_new_tokens=max_new_tokens)
    request = Request([*(history or []), Turn("human", text)], pictures, params, [Path(a) for a in audios])
    return Engine(model).generate([request])[0].text.strip()


def check_question(question: str, n_images: int, history: list[Turn] | None = None) -> None:
    """Refuse an empty question, and ``<image>`` placeholders that do not match the images given.

    Either every image has its placeholder in the conversation or none has one (then they go
    before the question); any other count would fail later as a token mismatch, or silently
    leave an image out.
    """
    if not question.strip():
        raise ValueError("the question is empty; ask something, or leave the question out for an interactive chat")
    placed = sum(t.text.count(IMAGE_PLACEHOLDER) for t in [*(history or []), Turn("human", question)])
    if placed and placed != n_images:
        raise ValueError(f"the question holds {placed} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s) "
                         f"were given; give one --image per {IMAGE_PLACEHOLDER}, or leave the placeholders out")


def _with_placeholders(question: str, n_images: int) -> str:
    return "\n".join([IMAGE_PLACEHOLDER] * n_images + [question])


class ChatSession:
    """A conversation with one model: its turns, its images in placeholder order, and those not yet asked about."""

    def __init__(self, model: VisionLanguageModel, params: SamplingParams | None = None):
        self.engine = Engine(model, max_batch_size=1)
        self.params = params or SamplingParams()
        self.history: list[Turn] = []
        self.images: list[Image.Image] = []  # those the history's placeholders refer to
        self.pending: list[Image.Image] = []  # attached, for the next question

    def attach(self, path: str | Path) -> None:
        """Attach an image to the next question; a missing or broken file raises DataError naming it."""
        self.pending.append(load_image(Path(path)))

    def reset(self) -> None:
        self.history, self.images, self.pending = [], [], []

    def answer(self, question: str) -> Iterator[str]:
        """Stream the answer to ``question``; the turn joins the conversation once it is complete.

        A question the engine refuses raises before anything is streamed, and leaves the
        conversation (and the attached images) as they were.
        """
        check_question(question, len(self.pending))
        text = question if IMAGE_PLACEHOLDER in question else _with_placeholders(question, len(self.pending))
        turn = Turn("human", text)
        request = Request([*self.history, turn], [*self.images, *self.pending], self.params)
        stream = self.engine.stream([request])  # checks the request in full on the first next()
        first = next(stream)
        pieces = [first.text]
        yield first.text
        for delta in stream:
            pieces.append(delta.text)
            yield delta.text
        self.history += [turn, Turn("gpt", "".join(pieces).strip())]
        self.images += self.pending
        self.pending = []


def interactive(model: VisionLanguageModel, images: list[Path], params: SamplingParams | None = None, *,
                read: Callable[[str], str] | None = None, out: TextIO | None = None) -> None:
    """A terminal REPL: answers are streamed as they come; a bad line is reported and the session goes on."""
    read = read or input
    out = out or sys.stdout
    session = ChatSession(model, params)
    for img in images:  # a missing image fails before the first question, not after it
        session.attach(img)
    print(f"chiasm chat: empty line or Ctrl-D to quit; {HELP}", file=out)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            break
        if not line or line == "/quit":
            break
        try:
            if not _command(session, line, out):
                _stream_answer(session, line, out)
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the session
            print("\n[answer interrupted; it is left out of the conversation]", file=out)
        except (DataError, RequestError, ValueError) as exc:  # the line, not the session, is wrong
            print(f"error: {exc}", file=out)


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a ``/`` command; False when the line is a question."""
    word, _, rest = line.partition(" ")
    if word == "/image":
        if not rest.strip():
            raise ValueError("/image needs a path, e.g. /image photos/cat.jpg")
        session.attach(rest.strip())
        print(f"attached {rest.strip()} to the next question", file=out)
    elif word == "/reset":
        session.reset()
        print("conversation and images cleared", file=out)
    elif word == "/help":
        print(HELP, file=out)
    elif word.startswith("/") and word[1:].isalpha():
        raise ValueError(f"unknown command {word}; {HELP}")
    else:
        return False
    return True


def _stream_answer(session: ChatSession, question: str, out: TextIO) -> None:
    started = False
    for piece in session.answer(question):
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            print("model> ", end="", file=out)
            started = True
        print(piece, end="", file=out, flush=True)
    if not started:
        print("model> ", end="", file=out)
    print(file=out, flush=True)
