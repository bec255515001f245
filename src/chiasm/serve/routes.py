"""The HTTP routes: chat completions (whole or streamed), models, health, explain, the web page.

Handlers only parse, wait and format: images are decoded in a thread of the pool and
everything that touches the model runs on the worker thread, so the event loop stays free to
answer ``/health`` and other clients while a batch runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import anyio
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from chiasm.generation import Delta, Request, SamplingParams
from chiasm.serve.errors import ApiError, bad_request
from chiasm.serve.http import check_api_key, read_json
from chiasm.serve.images import load_image_url
from chiasm.serve.openai_objects import DONE, Reply, event
from chiasm.serve.schema import ChatRequest, parse_chat_request
from chiasm.serve.settings import ServeSettings
from chiasm.serve.worker import Call, Item, Job, ModelWorker

WEB_FOLDER = "web"  # package data of chiasm: the page and its scripts
POLL_S = 0.25  # how often a handler waiting for the model looks whether its client is still there


class ClientGone(Exception):
    """The client closed the connection while its request waited for the model."""


@dataclass
class ServerState:
    """What the routes share: the settings, the served model's name and the worker that owns it."""

    settings: ServeSettings
    model_name: str
    worker: ModelWorker
    model: Any
    started: int = field(default_factory=lambda: int(time.time()))


async def chat_completions(http: HttpRequest) -> Response:
    state: ServerState = http.app.state.chiasm
    check_api_key(http, state.settings.api_key)
    chat = parse_chat_request(await read_json(http, state.settings.max_body_bytes), state.settings)
    if chat.model != state.model_name:
        raise ApiError(404, f"the model {chat.model!r} does not exist on this server; it serves "
                            f"{state.model_name!r}", param="model", code="model_not_found")
    images = await anyio.to_thread.run_sync(_load_images, chat, state.settings)
    audios = await anyio.to_thread.run_sync(_load_audio, chat, state.settings)
    params = SamplingParams(max_new_tokens=chat.max_tokens or 1, temperature=chat.temperature, top_p=chat.top_p,
                            top_k=chat.top_k, seed=chat.seed, stop=chat.stop)
    job = Job(loop=asyncio.get_running_loop(), request=Request(chat.conversation, images, params, audios),
              max_tokens=chat.max_tokens)
    state.worker.submit(job)
    reply = Reply(state.model_name, include_usage=chat.include_usage)
    waiter = Waiter(job, http)
    try:
        deltas = [await waiter.next()]  # a refusal comes first, as a status code, even when streaming
        if chat.stream:
            return StreamingResponse(_sse(job, deltas[0], reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while not deltas[-1].finished:
            deltas.append(await waiter.next())
    except BaseException:
        job.cancel()  # stops the model's work for a client that left
        raise
    return JSONResponse(reply.completion(deltas))


def _load_images(chat: ChatRequest, settings: ServeSettings) -> list:
    return [load_image_url(url, settings, where=where) for url, where in chat.image_urls]


def _load_audio(chat: ChatRequest, settings: ServeSettings) -> list:
    from chiasm.serve.audio import decode_input_audio

    return [decode_input_audio(data, fmt, where=where, max_bytes=settings.max_image_bytes)
            for data, fmt, where in chat.audio_clips]


class Waiter:
    """Takes an item's events while watching its client: ClientGone (and the item cancelled) once it left.

    The client is looked at every ``POLL_S`` however fast events come, so a long answer whose
    pieces arrive without pause is still stopped when nobody waits for it any more.
    """

    def __init__(self, item: Item, http: HttpRequest) -> None:
        self.item, self.http = item, http
        self.checked = time.monotonic()

    async def next(self) -> Any:
        """The next event, raised if it is an error."""
        getter = asyncio.ensure_future(self.item.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=POLL_S)
                if time.monotonic() - self.checked >= POLL_S:
                    self.checked = time.monotonic()
                    if await self.http.is_disconnected():
                        self.item.cancel()
                        raise ClientGone()
                if done:
                    break
        finally:
            getter.cancel()  # a no-op once it has its event; a pending get gives up without taking one
        got = getter.result()
        if isinstance(got, BaseException):
            raise got
        return got


async def _sse(job: Job, first: Delta, reply: Reply) -> AsyncIterator[str]:
    """The stream of one answer: a role chunk, content chunks, a finish chunk, usage if asked, [DONE].

    Cancelled (the client went away) at any ``await``: the ``finally`` cancels the job so the
    model stops working for nobody.
    """
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        delta = first
        while True:
            if delta.text:
                yield reply.chunk({"content": delta.text})
            if delta.finished:
                break
            got = await job.events.get()
            if isinstance(got, ApiError):  # the status line is gone: the error travels as an event
                yield event(got.body())
                return
            delta = got
        yield reply.chunk({}, delta.finish_reason)
        if reply.include_usage:
            yield reply.usage_chunk(delta)
        yield DONE
    finally:
        job.cancel()


async def list_models(http: HttpRequest) -> Response:
    state: ServerState = http.app.state.chiasm
    check_api_key(http, state.settings.api_key)
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "chiasm"}]})


async def health(http: HttpRequest) -> Response:
    state: ServerState = http.app.state.chiasm
    worker = state.worker
    ok = worker.alive
    body = {"status": "ok" if ok else "unavailable", "model": state.model_name, "running": worker.busy,
            "waiting": worker.queue.qsize()}
    return JSONResponse(body, status_code=200 if ok else 503)


async def explain_route(http: HttpRequest) -> Response:
    state: ServerState = http.app.state.chiasm
    check_api_key(http, state.settings.api_key)
    if importlib.util.find_spec("chiasm.explain") is None:
        raise ApiError(501, "/v1/explain is not available in this version of chiasm (no chiasm.explain module)",
                       code="not_implemented")
    body = await read_json(http, state.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object {\"image\": ..., \"question\": ...}")
    unknown = sorted(set(body) - {"image", "question", "answer", "top_words"})
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(map(repr, unknown))}; expected image, question, "
                          "answer, top_words", unknown[0])
    image_url, question = body.get("image"), body.get("question")
    if not isinstance(image_url, str) or not image_url:
        raise bad_request("'image' is required: a data:image/...;base64 URL", "image")
    if not isinstance(question, str) or not question.strip():
        raise bad_request("'question' is required: a non-empty string", "question")
    answer = body.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise bad_request("'answer' must be a string or left out", "answer")
    top_words = body.get("top_words", 3)
    if isinstance(top_words, bool) or not isinstance(top_words, int) or not 1 <= top_words <= 20:
        raise bad_request("'top_words' must be an integer in [1, 20]", "top_words")
    image = await anyio.to_thread.run_sync(lambda: load_image_url(image_url, state.settings, where="image"))
    from chiasm.explain import explain

    call = Call(loop=asyncio.get_running_loop(),
                fn=lambda: explain(state.model, image, question, answer=answer, top_words=top_words))
    state.worker.submit(call)
    try:
        result = await Waiter(call, http).next()
    except ValueError as exc:  # chiasm's own refusals of a question or an image
        raise bad_request(str(exc)) from exc
    finally:
        call.cancel()
    return JSONResponse(result)


async def index(http: HttpRequest) -> Response:
    return _web_file("index.html")


async def static(http: HttpRequest) -> Response:
    return _web_file(http.path_params["path"])


def _web_file(name: str) -> Response:
    """A file of the package folder ``chiasm/web`` (never outside it), or a 404 that says what is missing."""
    root = resources.files("chiasm").joinpath(WEB_FOLDER)
    if not root.is_dir():
        raise ApiError(404, "the web page is not part of this installation (no chiasm/web folder)", code="not_found")
    parts = name.split("/")
    if any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise ApiError(404, f"no such file: /static/{name}", code="not_found")
    target = root.joinpath(*parts)
    if not target.is_file():
        raise ApiError(404, f"no such file: /static/{name}", code="not_found")
    return FileResponse(str(target))
