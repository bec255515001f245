"""What the server tests share: images as data URLs, raw HTTP for what the official client will not send.

The official ``openai`` client is the one real clients use, so the tests speak through it
wherever it can express the request; malformed bodies, wrong content types and broken streams
go through ``http.client`` because no well-behaved client sends them.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import openai
from PIL import Image
from starlette.applications import Starlette

MODEL = "tiny"


def png_bytes(size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width x height`` but whose data is a few bytes.

    Decoding it would allocate width x height pixels; the server must refuse it from the header.
    """
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *image_urls: str) -> dict:
    """A user message: the images first, then the question (the usual VQA layout)."""
    return {"role": "user", "content": [*(image_part(u) for u in image_urls), {"type": "text", "text": text}]}


def client(url: str, api_key: str = "unused", **kwargs) -> openai.OpenAI:
    """The official client on the test server, without retries (a refusal must show as it is)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return self.json()["error"]["message"]


def raw(url: str, method: str, path: str, body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None) -> Raw:
    """One plain HTTP exchange (any body, any headers), read to the end; an iterator body goes chunked."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, bytes | None))
        reply = conn.getresponse()
        return Raw(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()


def post_json(url: str, body: object, path: str = "/v1/chat/completions", **headers: str) -> Raw:
    data = json.dumps(body).encode()
    return raw(url, "POST", path, data, {"Content-Type": "application/json", **headers})


@contextmanager
def spy_on_batches(app: Starlette, delay_s: float = 0.0) -> Iterator[dict]:
    """Record the size of every batch the server's engine runs and count its Deltas.

    ``delay_s`` after each Delta makes a generation last long enough for a test to act in
    the middle of it. The engine itself still computes every token.
    """
    engine = app.state.chiasm.worker.engine
    seen: dict = {"batches": [], "deltas": 0}
    real = engine.stream

    def stream(requests: list) -> Iterator:
        seen["batches"].append(len(requests))
        for delta in real(requests):
            seen["deltas"] += 1
            time.sleep(delay_s)
            yield delta

    engine.stream = stream
    try:
        yield seen
    finally:
        del engine.stream  # the class's method again


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
