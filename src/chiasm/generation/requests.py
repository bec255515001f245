"""What a caller asks the engine for, and what it gets back.

These are the shapes the server and the terminal chat share: a :class:`Request` is a
conversation with its images and :class:`SamplingParams`; the engine answers with
:class:`Delta` pieces while it runs and one :class:`Completion` per request at the end.
Bad input raises :class:`RequestError` (a ``ValueError``), one line naming what is wrong,
so a server can answer it as a client error and a chat can print it and go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from chiasm.data.sample import Turn


class RequestError(ValueError):
    """A request the engine refuses before any model work, with a one-line reason."""


@dataclass
class SamplingParams:
    """How the next tokens are chosen and when an answer ends."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # same seed + same request -> same tokens, whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the output

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    """A conversation ending with a human turn; one image per ``<image>`` placeholder, in order (and one
    audio clip per ``<audio>`` placeholder)."""

    conversation: list[Turn]
    images: list[Image.Image | str | Path] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    # One clip per ``<audio>`` placeholder (a model that hears): 16 kHz mono samples or a file path.
    audios: list[np.ndarray | str | Path] = field(default_factory=list)


@dataclass
class Delta:
    """One streamed piece of one request: the text and tokens new since its previous Delta.

    ``completion_tokens`` counts the answer's tokens so far; an end-of-turn token that ends
    the answer is neither listed nor counted (its Delta has no token ids), so the token ids of
    all Deltas of a request are exactly its Completion's.
    """

    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    """A finished answer: the concatenation of its request's Deltas."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
