"""Request checks: everything that can be wrong with a request is found before the model runs.

Checking a request also prepares it (prompt token ids, decoded RGB images), so the engine
never tokenises or opens an image twice, and a batch holding one bad request fails as a
whole before any of it costs model time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from chiasm.chat_template import TemplateProblem
from chiasm.data.images import load_image
from chiasm.data.sample import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, DataError, Sample
from chiasm.errors import one_line
from chiasm.generation.requests import Request, RequestError, SamplingParams
from chiasm.processor import Processor

ROLES = ("system", "human", "gpt")


@dataclass
class PreparedRequest:
    """A request that passed every check: its prompt ids and its images, ready to batch."""

    request: Request
    input_ids: list[int]
    images: list[Image.Image]
    audio: list[torch.Tensor] = field(default_factory=list)  # log-mel windows, in placeholder order

    @property
    def params(self) -> SamplingParams:
        return self.request.params


def check_params(p: SamplingParams) -> None:
    """Refuse sampling values that would fail or silently mean something else inside the loop."""
    if isinstance(p.max_new_tokens, bool) or not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be an integer >= 1, got {p.max_new_tokens!r}")
    if not _number(p.temperature) or p.temperature < 0:
        raise RequestError(f"temperature must be a finite number >= 0 (0: greedy), got {p.temperature!r}")
    if not _number(p.top_p) or not 0 < p.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {p.top_p!r}")
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, int) or p.top_k < 0:
        raise RequestError(f"top_k must be an integer >= 0 (0: off), got {p.top_k!r}")
    if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, int) or not 0 <= p.seed < 2**63):
        raise RequestError(f"seed must be an integer in [0, 2**63) or None, got {p.seed!r}")
    if not isinstance(p.stop, list | tuple) or not all(isinstance(s, str) and s for s in p.stop):
        raise RequestError(f"stop must be a list of non-empty strings, got {p.stop!r}")


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_conversation(request: Request) -> None:
    """Roles known, a human turn last, one image per ``<image>`` placeholder."""
    turns = request.conversation
    if not isinstance(turns, list | tuple) or not turns:
        raise RequestError("the conversation is empty; it must end with a 'human' turn")
    for n, t in enumerate(turns, start=1):
        if getattr(t, "role", None) not in ROLES or not isinstance(getattr(t, "text", None), str):
            raise RequestError(f"turn {n} is not a Turn with a role in {ROLES} and a text: {t!r}")
    if turns[-1].role != "human":
        raise RequestError(f"the conversation must end with a 'human' turn, not {turns[-1].role!r}")
    placed = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if placed != len(request.images):
        raise RequestError(f"the conversation holds {placed} {IMAGE_PLACEHOLDER} placeholder(s) but "
                           f"{len(request.images)} image(s) were given; give one image per placeholder")
    heard = sum(t.text.count(AUDIO_PLACEHOLDER) for t in turns)
    if heard != len(request.audios):
        raise RequestError(f"the conversation holds {heard} {AUDIO_PLACEHOLDER} placeholder(s) but "
                           f"{len(request.audios)} audio clip(s) were given; give one clip per placeholder")


def open_audio(clip: object, n: int, processor: Processor) -> torch.Tensor:
    """Audio clip ``n`` (1-based) as the log-mel window the model hears, or a RequestError naming it."""
    if processor.audio is None:
        raise RequestError("this model does not hear: it takes no audio (its config has no [model.audio])")
    try:
        if isinstance(clip, str | Path):
            return processor.load_audio(clip)
        if isinstance(clip, np.ndarray):
            return processor.audio(clip.astype(np.float32, copy=False), f"audio {n}")
    except DataError as exc:
        raise RequestError(f"audio {n}: {exc.message}") from None
    raise RequestError(f"audio {n}: expected 16 kHz mono samples (a numpy array) or a file path, "
                       f"got {type(clip).__name__}")


def open_image(image: object, n: int) -> Image.Image:
    """Image ``n`` (1-based) of a request as a fully decoded RGB picture, or a RequestError naming it."""
    if isinstance(image, str | Path):
        try:
            return load_image(Path(image))
        except DataError as exc:
            raise RequestError(f"image {n}: {exc.message}") from None
    if isinstance(image, Image.Image):
        try:
            image.load()  # a lazily opened file may be truncated: find out now, not inside the batch
            return image if image.mode == "RGB" else image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise RequestError(f"image {n}: cannot decode the picture ({one_line(str(exc))})") from None
    raise RequestError(f"image {n}: expected a PIL image or a file path, got {type(image).__name__}")


def prepare(request: Request, processor: Processor, context: int) -> PreparedRequest:
    """Check ``request`` in full (values, conversation, images, length) and return it ready to batch.

    ``context`` is the most positions the LM may hold: the prompt and every new token must fit.
    """
    if not isinstance(request, Request):
        raise RequestError(f"expected a chiasm.generation.Request, got {type(request).__name__}")
    check_params(request.params)
    check_conversation(request)
    images = [open_image(im, n) for n, im in enumerate(request.images, start=1)]
    audio = [open_audio(clip, n, processor) for n, clip in enumerate(request.audios, start=1)]
    sample = Sample(id="request", conversations=list(request.conversation),
                    images=[Path(f"image-{n}") for n in range(len(images))], source="<request>",
                    meta={"image_sizes": [im.size for im in images]},  # a tiled image's tokens follow its size
                    audios=[Path(f"audio-{n}") for n in range(len(audio))])
    try:
        ids = processor.conversation.encode_prompt(sample).input_ids
    except (DataError, TemplateProblem) as exc:
        raise RequestError(one_line(getattr(exc, "message", str(exc)))) from None
    total = len(ids) + request.params.max_new_tokens
    if total > context:
        raise RequestError(f"the prompt's {len(ids)} tokens + max_new_tokens {request.params.max_new_tokens} = "
                           f"{total} exceed the model's context of {context} tokens; lower max_new_tokens or "
                           "shorten the conversation")
    return PreparedRequest(request, ids, images, audio)
