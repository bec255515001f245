"""An OpenAI chat-completions body -> what the engine runs, refusing what this server cannot honour.

OpenAI roles map onto chiasm's (``user`` -> ``human``, ``assistant`` -> ``gpt``, ``system`` and
``developer`` -> ``system``); each ``image_url`` part becomes an ``<image>`` placeholder at its
place in the text, so the images keep the order and position the client gave them; each
``input_audio`` part likewise becomes an ``<audio>`` placeholder (for a model that hears). A field
that would change the answer and that this server does not implement (``n`` > 1, tools,
log-probabilities, penalties, a JSON response format) is refused by name rather than silently
ignored, and so is an unknown field (a misspelt ``temprature`` would otherwise pass unnoticed).
Images are only collected here; decoding them is slow and happens off the event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from chiasm.data.sample import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, Turn
from chiasm.serve.errors import bad_request
from chiasm.serve.settings import ServeSettings

_ROLES = {"user": "human", "assistant": "gpt", "system": "system", "developer": "system"}
# Accepted and without effect on the answer.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
            "prompt_cache_key"}
# Accepted only at the value that means "not used".
_UNSUPPORTED_UNLESS = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
                       "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
                       "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                       "logit_bias": (None, {}), "audio": (None,), "prediction": (None,),
                       "modalities": (None, ["text"]), "reasoning_effort": (None,), "web_search_options": (None,)}
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "n", "stream", "stream_options", "response_format"} | _IGNORED | set(_UNSUPPORTED_UNLESS)


@dataclass
class ChatRequest:
    """A parsed request: the conversation with placeholders, the image URLs in order, sampling values."""

    model: str
    conversation: list[Turn]
    image_urls: list[tuple[str, str]]   # (url, where it was in the request, for errors)
    max_tokens: int | None
    # (base64 data, format, where) of each input_audio part, in placeholder order
    audio_clips: list[tuple[str, str, str]] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: Any, settings: ServeSettings) -> ChatRequest:
    """Check ``body`` (decoded JSON) field by field; raise :class:`ApiError` naming the first bad one."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_kind(body)}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(map(repr, unknown))}; this server accepts "
                          f"{', '.join(sorted(_KNOWN - _IGNORED))}", unknown[0], "unknown_field")
    for name, neutral in _UNSUPPORTED_UNLESS.items():
        if name in body and body[name] not in neutral:
            raise bad_request(f"{name!r} is not supported by this server; leave it out", name, "unsupported_field")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a string naming the model (see GET /v1/models)", "model")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad_request(f"'n' must be 1 (one choice per request), got {n!r}; send several requests instead", "n")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported by this server",
                          "response_format", "unsupported_field")
    conversation, image_urls, audio_clips = _parse_messages(body.get("messages"), settings)
    stream = _optional(body, "stream", bool, False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed with \"stream\": true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request("'stream_options' must be an object with only 'include_usage'", "stream_options")
        include_usage = _optional(options, "include_usage", bool, False, param="stream_options.include_usage")
    return ChatRequest(model=model, conversation=conversation, image_urls=image_urls, audio_clips=audio_clips,
                       max_tokens=_max_tokens(body, settings),
                       temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                       top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                       top_k=_integer(body, "top_k", 0, 0),
                       seed=_integer(body, "seed", None, 0),
                       stop=_stop(body.get("stop")), stream=stream, include_usage=include_usage)


def _parse_messages(messages: Any, settings: ServeSettings
                    ) -> tuple[list[Turn], list[tuple[str, str]], list[tuple[str, str, str]]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    if len(messages) > settings.max_messages:
        raise bad_request(f"'messages' holds {len(messages)} messages, over this server's limit of "
                          f"{settings.max_messages}", "messages")
    turns: list[Turn] = []
    urls: list[tuple[str, str]] = []
    clips: list[tuple[str, str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object, got {_kind(message)}", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise bad_request(f"{where}.role {role!r} is not supported; use one of {', '.join(_ROLES)}",
                              f"{where}.role")
        text, images, audio = _parse_content(message.get("content"), where, settings)
        if (images or audio) and role != "user":
            raise bad_request(f"{where}: images and audio are only allowed in user messages, not {role!r}",
                              f"{where}.content")
        urls += images
        clips += audio
        if len(clips) > settings.max_images_per_request:
            raise bad_request(f"the request holds more than {settings.max_images_per_request} audio clips, this "
                              "server's limit per request", where, "too_many_audio_clips")
        if len(urls) > settings.max_images_per_request:
            raise bad_request(f"the request holds more than {settings.max_images_per_request} images, this server's "
                              "limit per request", where, "too_many_images")
        turns.append(Turn(_ROLES[role], text))
    if turns[-1].role != "human":
        raise bad_request(f"the last message must come from the user (it is {messages[-1]['role']!r}): the model "
                          "answers the user's last message", f"messages[{len(messages) - 1}].role")
    return turns, urls, clips


def _parse_content(content: Any, where: str, settings: ServeSettings
                   ) -> tuple[str, list[tuple[str, str]], list[tuple[str, str, str]]]:
    """A message's text with a placeholder per image or audio part, and the image URLs and clips in order."""
    if isinstance(content, str):
        _check_text(content, f"{where}.content")
        return content, [], []
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where}.content must be a string or a non-empty list of content parts", f"{where}.content")
    pieces: list[str] = []
    urls: list[tuple[str, str]] = []
    clips: list[tuple[str, str, str]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            _check_text(part["text"], f"{at}.text")
            pieces.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url:
                raise bad_request(f"{at}.image_url must be an object with a 'url' string", f"{at}.image_url")
            if image.get("detail", "auto") not in ("auto", "low", "high"):
                raise bad_request(f"{at}.image_url.detail must be auto, low or high", f"{at}.image_url.detail")
            urls.append((url, at))
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "input_audio":
            clips.append(_input_audio(part.get("input_audio"), at))
            pieces.append(AUDIO_PLACEHOLDER)
        elif kind in ("text", None):
            raise bad_request(f"{at} must be an object {{\"type\": \"text\", \"text\": ...}} or "
                              f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}", at)
        else:
            raise bad_request(f"{at}: content part type {kind!r} is not supported; use text, image_url or "
                              "input_audio", at)
    if len(urls) > settings.max_images_per_message:
        raise bad_request(f"{where} holds {len(urls)} images, over this server's limit of "
                          f"{settings.max_images_per_message} per message", f"{where}.content", "too_many_images")
    return "\n".join(pieces), urls, clips


def _input_audio(part: Any, at: str) -> tuple[str, str, str]:
    """``{"data": base64, "format": "wav"}`` checked (decoded later, off the event loop)."""
    from chiasm.serve.audio import FORMATS

    if not isinstance(part, dict) or not isinstance(part.get("data"), str) or not part["data"]:
        raise bad_request(f"{at}.input_audio must be an object with a base64 'data' string and a 'format'",
                          f"{at}.input_audio")
    fmt = part.get("format")
    if fmt not in FORMATS:
        raise bad_request(f"{at}.input_audio.format must be one of {', '.join(FORMATS)}, got {fmt!r}",
                          f"{at}.input_audio.format")
    return part["data"], fmt, at


def _check_text(text: str, param: str) -> None:
    if IMAGE_PLACEHOLDER in text:  # it would count as an image slot with no image behind it
        raise bad_request(f"{param} holds the text {IMAGE_PLACEHOLDER!r}, which this model reserves for images; "
                          "send images as image_url content parts", param)
    if AUDIO_PLACEHOLDER in text:  # likewise an audio slot with no clip behind it
        raise bad_request(f"{param} holds the text {AUDIO_PLACEHOLDER!r}, which this model reserves for audio; "
                          "send audio as input_audio content parts", param)


def _max_tokens(body: dict, settings: ServeSettings) -> int | None:
    given = [k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; send one", "max_tokens")
    if not given:
        return None
    value = _integer(body, given[0], None, 1)
    if value > settings.max_tokens_limit:
        raise bad_request(f"'{given[0]}' is {value}, over this server's limit of {settings.max_tokens_limit}",
                          given[0], "max_tokens_too_large")
    return value


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad_request("'stop' must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return stops


def _optional(body: dict, name: str, kind: type, default: Any, *, param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad_request(f"'{param or name}' must be a {kind.__name__}, got {_kind(value)}", param or name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {value!r}", name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad_request(f"'{name}' must be in {interval}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {value!r}", name)
    if value < low or value >= 2**63:
        raise bad_request(f"'{name}' must be an integer >= {low}, got {value}", name)
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")

