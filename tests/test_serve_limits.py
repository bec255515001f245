"""Whatever a client sends, the server answers a clear OpenAI-style error and keeps serving.

One server with small limits takes every kind of bad request (malformed and oversized
bodies, wrong content types, bad fields, images that are too big, not images or bombs,
paths outside its image folder, prompts longer than the context); each must get its own
status and a message naming the problem, and a good request must still be answered after all.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import openai
import pytest
from serving.helpers import MODEL, bomb_png, client, data_url, image_part, png_bytes, post_json, raw, user

from chiasm.serve.app import create_app
from chiasm.serve.background import BackgroundServer
from chiasm.serve.settings import ServeSettings

KIB = 1024
RED = data_url(png_bytes())


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An image folder the server may read (one image, one symlink leading out) and a file outside it."""
    root = tmp_path_factory.mktemp("served-files")
    inside, outside = root / "images", root / "secret.png"
    inside.mkdir()
    (inside / "red.png").write_bytes(png_bytes())
    outside.write_bytes(png_bytes())
    os.symlink(outside, inside / "escape.png")
    return inside, outside


@pytest.fixture(scope="module")
def server(saved_model_dir: Path, folders: tuple[Path, Path]):
    settings = ServeSettings(model_name=MODEL, max_body_bytes=256 * KIB, max_image_bytes=32 * KIB,
                             max_image_pixels=200 * 200, max_images_per_message=2, max_images_per_request=3,
                             max_tokens_limit=64, default_max_tokens=8, max_messages=16,
                             image_folder=folders[0])
    with BackgroundServer(create_app(saved_model_dir, settings)) as running:
        yield running


def chat(**fields) -> dict:
    """A good request with ``fields`` replaced (None removes a field)."""
    body = {"model": MODEL, "messages": [user("What colour?", RED)], "max_tokens": 4, **fields}
    return {k: v for k, v in body.items() if v is not None}


def with_image(url: str) -> dict:
    return chat(messages=[user("What colour?", url)])


NOISE = base64.b64encode(os.urandom(40 * KIB)).decode()
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 200)  # far more tokens than the context of 512
NEAR = " ".join(["the quick brown fox jumps over the lazy dog"] * 28)  # fits the context, but not with 64 more

# (name, request body, status, words the error message must hold)
FIELD_CASES = [
    ("not an object", [1, 2], 400, "must be a JSON object"),
    ("no model", chat(model=None), 400, "'model' is required"),
    ("unknown model", chat(model="gpt-9"), 404, "'gpt-9' does not exist on this server"),
    ("no messages", chat(messages=[]), 400, "'messages' must be a non-empty list"),
    ("too many messages", chat(messages=[{"role": "user", "content": "hi"}] * 17), 400, "over this server's limit"),
    ("message not an object", chat(messages=["hi"]), 400, "messages[0] must be an object"),
    ("tool role", chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role 'tool' is not supported"),
    ("audio part without data", chat(messages=[{"role": "user", "content": [{"type": "input_audio",
                                                                             "input_audio": {}}]}]), 400,
     "input_audio must be an object with a base64 'data' string"),
    ("unknown part type", chat(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]),
     400, "content part type 'video_url' is not supported"),
    ("text part without text", chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "messages[0].content[0] must be an object"),
    ("assistant last", chat(messages=[user("hi"), {"role": "assistant", "content": "yes"}]), 400,
     "the last message must come from the user"),
    ("image from the assistant", chat(messages=[user("hi"), {"role": "assistant", "content": [image_part(RED)]},
                                                user("and?")]), 400,
     "images and audio are only allowed in user messages"),
    ("placeholder in text", chat(messages=[user("look <image> here")]), 400, "reserves for images"),
    ("n of 2", chat(n=2), 400, "'n' must be 1"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "'tools' is not supported"),
    ("logprobs", chat(logprobs=True), 400, "'logprobs' is not supported"),
    ("json format", chat(response_format={"type": "json_object"}), 400, "'response_format' other than"),
    ("misspelt field", chat(temprature=0.5), 400, "unknown field(s) 'temprature'"),
    ("temperature too high", chat(temperature=3), 400, "'temperature' must be in [0.0, 2.0], got 3"),
    ("top_p zero", chat(top_p=0), 400, "'top_p' must be in (0.0, 1.0]"),
    ("max_tokens zero", chat(max_tokens=0), 400, "'max_tokens' must be an integer >= 1"),
    ("max_tokens over the limit", chat(max_tokens=65), 400, "over this server's limit of 64"),
    ("max_tokens disagree", chat(max_tokens=4, max_completion_tokens=5), 400, "disagree"),
    ("seed not an integer", chat(seed="x"), 400, "'seed' must be an integer"),
    ("five stop strings", chat(stop=list("abcde")), 400, "'stop' must be a non-empty string or a list"),
    ("stream options alone", chat(stream_options={"include_usage": True}), 400, "only allowed with"),
    ("prompt over the context", chat(messages=[user(LONG)]), 400, "exceeds the LM's maximum of 512"),
    ("prompt over the context, no max_tokens", chat(messages=[user(LONG)], max_tokens=None), 400,
     "exceeds the LM's maximum of 512"),
    ("prompt and max_tokens over the context", chat(messages=[user(NEAR, RED)], max_tokens=64), 400,
     "exceed the model's context of 512 tokens"),
    ("image over the byte limit", with_image(f"data:image/png;base64,{NOISE}"), 413, "over this server's limit of "
                                                                                     "32768 bytes"),
    ("image over the pixel limit", with_image(data_url(png_bytes((300, 300)))), 400,
     "300x300 = 90000 pixels, over the limit of 40000"),
    ("decompression bomb", with_image(data_url(bomb_png(100_000, 100_000))), 400, "refused as a decompression bomb"),
    ("bomb under Pillow's own limit", with_image(data_url(bomb_png(5000, 5000))), 400,
     "5000x5000 = 25000000 pixels, over the limit of 40000"),
    ("not an image", with_image(data_url(b"hello, I am text")), 400, "not a usable image"),
    ("truncated image", with_image(data_url(png_bytes()[:60])), 400, "not a usable image"),
    ("bad base64", with_image("data:image/png;base64,@@@@"), 400, "invalid base64"),
    ("text data URL", with_image("data:text/plain;base64,aGVsbG8="), 400, "media type 'text/plain', not an image"),
    ("data URL not base64", with_image("data:image/png,abc"), 400, "not base64"),
    ("three images in a message", chat(messages=[user("?", RED, RED, RED)]), 400, "over this server's limit of 2 per"),
    ("four images in a request", chat(messages=[user("?", RED, RED), {"role": "assistant", "content": "ok"},
                                                user("?", RED, RED)]), 400, "more than 3 images"),
    ("remote image", with_image("http://127.0.0.1:9/red.png"), 403, "remote image URLs are disabled"),
    ("path outside", with_image("../secret.png"), 403, "outside the image folder"),
    ("absolute path outside", with_image("/etc/passwd"), 403, "outside the image folder"),
    ("file URL outside", with_image("file:///etc/hosts"), 403, "outside the image folder"),
    ("symlink leading out", with_image("escape.png"), 403, "outside the image folder"),
    ("missing file", with_image("nothing.png"), 400, "no image file 'nothing.png'"),
    ("other scheme", with_image("ftp://example.org/a.png"), 400, "unsupported URL scheme"),
]


@pytest.mark.parametrize(("body", "status", "words"), [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_bad_request_fields(server, body, status: int, words: str) -> None:
    reply = post_json(server.url, body)
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_bodies(server) -> None:
    good = json.dumps(chat()).encode()
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("malformed JSON", b'{"model": ', json_type, 400, "malformed JSON"),
        ("not UTF-8", b'{"model": "\xff"}', json_type, 400, "malformed JSON"),
        ("nested too deeply", b"[" * 200_000, json_type, 400, "malformed JSON"),
        ("empty body", b"", json_type, 400, "the request body is empty"),
        ("text content type", good, {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json"),
        ("form content type", good, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        ("no content type", good, {}, 415, "got 'none'"),
        ("body over the limit", b"{" + b" " * (256 * KIB), json_type, 413, "over this server's limit of 262144 bytes"),
        ("chunked body over the limit", iter([b"{" + b" " * (64 * KIB)] * 5), json_type, 413,
         "over this server's limit"),
    ]
    for name, body, headers, status, words in cases:
        reply = raw(server.url, "POST", "/v1/chat/completions", body, headers)
        assert (reply.status, words in reply.error) == (status, True), (name, reply.body)


def test_routes_and_methods(server) -> None:
    assert raw(server.url, "GET", "/v1/chat/completions").status == 405
    missing = raw(server.url, "GET", "/v1/nothing")
    assert missing.status == 404 and missing.error == "no route /v1/nothing"
    page = raw(server.url, "GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert raw(server.url, "GET", "/static/app.js").status == 200
    for escape in ("/static/..%2F..%2Fpyproject.toml", "/static/../__init__.py", "/static/%2Fetc%2Fpasswd"):
        assert raw(server.url, "GET", escape).status == 404, escape


def test_image_inside_the_folder_is_read(server) -> None:
    for url in ("red.png", "file://" + str(Path(server.server.config.app.state.chiasm.settings.image_folder)
                                           / "red.png")):
        reply = post_json(server.url, with_image(url))
        assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 4, reply.body


def test_no_max_tokens_takes_what_the_context_leaves(server) -> None:
    reply = post_json(server.url, chat(messages=[user(NEAR, RED)], max_tokens=None))
    assert reply.status == 200, reply.body
    usage = reply.json()["usage"]
    assert 470 < usage["prompt_tokens"] < 512 - 8 and usage["completion_tokens"] <= 8  # the default, which fits


def test_official_client_raises_the_matching_errors(server) -> None:
    c = client(server.url)
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        c.chat.completions.create(model=MODEL, messages=[user("hi", RED)], n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist on this server"):
        c.chat.completions.create(model="other", messages=[user("hi", RED)])
    with pytest.raises(openai.PermissionDeniedError, match="remote image URLs are disabled"):
        c.chat.completions.create(model=MODEL, messages=[user("hi", "https://example.org/a.png")])
    with pytest.raises(openai.BadRequestError, match="exceeds the LM's maximum of 512"):
        c.chat.completions.create(model=MODEL, messages=[user(LONG)], stream=True)


ODD_VALUES = [None, 0, -1, 2**70, 1e308, float("nan"), "", "x", "<image>", [], [None], [[[]]], {}, {"a": 1}, True]


def _paths(value, prefix: tuple = ()):
    """Every place in a JSON value: the keys and indices that lead to it."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


def _replaced(value, path: tuple, new):
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    inner = copy
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = new
    return copy


def test_any_value_in_any_field_is_answered_without_a_server_error(server) -> None:
    """Each place of a full request, in turn, takes each of a set of odd values: never a 5xx."""
    good = chat(messages=[{"role": "system", "content": "Be brief."}, user("What?", RED)], temperature=0.5,
                top_p=0.9, seed=1, stop=["x"], stream=False, top_k=3, n=1, max_tokens=2)
    seen = set()
    for path in list(_paths(good)):
        for odd in ODD_VALUES:
            reply = raw(server.url, "POST", "/v1/chat/completions", json.dumps(_replaced(good, path, odd)).encode(),
                        {"Content-Type": "application/json"})
            assert reply.status < 500 and (reply.status == 200 or reply.error), (path, odd, reply.body)
            seen.add(reply.status)
    assert seen >= {200, 400, 404}


def test_still_serving_after_every_refusal(server) -> None:
    """Runs last in this file: the worker survived everything above."""
    assert raw(server.url, "GET", "/health").json()["status"] == "ok"
    reply = client(server.url).chat.completions.create(model=MODEL, messages=[user("hi", RED)], max_tokens=3)
    assert reply.usage.completion_tokens == 3
