"""``chiasm serve`` speaks OpenAI's chat API: the official client against a real server on loopback.

Every answer is checked against the generation engine run directly on the same saved model
with the same request (sampled with a seed, so the tokens are not a constant the random tiny
model happens to repeat): the server must add nothing and lose nothing on the way.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from PIL import Image
from serving.helpers import (
    MODEL,
    client,
    data_url,
    png_bytes,
    post_json,
    raw,
    spy_on_batches,
    user,
    wait_until,
)

from chiasm.data.sample import Turn
from chiasm.generation import Completion, Engine, Request, SamplingParams
from chiasm.model import VisionLanguageModel
from chiasm.serve.app import create_app
from chiasm.serve.background import BackgroundServer
from chiasm.serve.settings import ServeSettings
from chiasm.serve.worker import Call

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (220, 220, 20), (128, 0, 128), (0, 0, 0), (255, 255, 255),
           (90, 160, 200)]


@pytest.fixture(scope="module")
def served(saved_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServeSettings(model_name=MODEL, max_batch_size=4, batch_wait_ms=50, max_tokens_limit=400,
                             default_max_tokens=12)
    app = create_app(saved_model_dir, settings)
    with BackgroundServer(app) as server:
        yield server, app


@pytest.fixture(scope="module")
def engine(saved_model_dir: Path) -> Engine:
    return Engine(VisionLanguageModel.load(saved_model_dir))


def reference(engine: Engine, question: str, colour: tuple[int, int, int], **params) -> Completion:
    """What the engine answers alone for one image (sent first) and a question."""
    image = Image.open(io.BytesIO(png_bytes(colour=colour))).convert("RGB")
    request = Request([Turn("human", f"<image>\n{question}")], [image], SamplingParams(**params))
    return engine.generate([request])[0]


def test_completion_with_image_matches_the_engine(served, engine: Engine) -> None:
    server, _ = served
    reply = client(server.url).chat.completions.create(
        model=MODEL, messages=[user("What colour is it?", data_url(png_bytes()))], max_tokens=20,
        temperature=1.0, top_p=0.9, seed=7)
    want = reference(engine, "What colour is it?", COLOURS[0], max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert reply.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    assert want.prompt_tokens > 16  # the image's 16 visual tokens are counted in the prompt


def test_stream_with_image_matches_the_engine(served, engine: Engine) -> None:
    server, _ = served
    chunks = list(client(server.url).chat.completions.create(
        model=MODEL, messages=[user("Describe the image.", data_url(png_bytes(colour=COLOURS[2])))],
        max_completion_tokens=24, temperature=0.8, seed=3, stream=True, stream_options={"include_usage": True}))
    want = reference(engine, "Describe the image.", COLOURS[2], max_new_tokens=24, temperature=0.8, seed=3)
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == want.finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (want.prompt_tokens,
                                                                                   want.completion_tokens)


def test_stream_is_server_sent_events_ending_with_done(served) -> None:
    server, _ = served
    reply = post_json(server.url, {"model": MODEL, "messages": [user("Hi", data_url(png_bytes()))], "max_tokens": 4,
                                   "stream": True})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = [e for e in reply.body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    bodies = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "usage" not in bodies[0]  # only with stream_options.include_usage
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"


def test_max_tokens_stop_and_defaults(served, engine: Engine) -> None:
    server, _ = served
    c = client(server.url)
    url = data_url(png_bytes())
    short = c.chat.completions.create(model=MODEL, messages=[user("Count.", url)], max_tokens=3, seed=1)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    default = c.chat.completions.create(model=MODEL, messages=[user("Count.", url)], seed=1)
    assert default.usage.completion_tokens <= 12  # the server's default_max_tokens
    full = reference(engine, "Count.", COLOURS[0], max_new_tokens=40, temperature=1.0, seed=5)
    cut = full.text[len(full.text) // 2:][:2]  # a stop string taken from inside the answer
    assert cut
    stopped = c.chat.completions.create(model=MODEL, messages=[user("Count.", url)], max_tokens=40, seed=5, stop=cut)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full.text[:full.text.index(cut)]


def test_conversation_roles_and_text_only(served, engine: Engine) -> None:
    server, _ = served
    messages = [{"role": "system", "content": "Answer briefly."}, user("What is it?", data_url(png_bytes())),
                {"role": "assistant", "content": "a square"}, {"role": "user", "content": "And its colour?"}]
    reply = client(server.url).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    image = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    turns = [Turn("system", "Answer briefly."), Turn("human", "<image>\nWhat is it?"), Turn("gpt", "a square"),
             Turn("human", "And its colour?")]
    want = engine.generate([Request(turns, [image], SamplingParams(max_new_tokens=10))])[0]
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == want.prompt_tokens


def test_models_and_health(served) -> None:
    server, _ = served
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "chiasm"
    health = raw(server.url, "GET", "/health")
    assert health.status == 200 and health.json()["status"] == "ok" and health.json()["model"] == MODEL


def test_concurrent_clients_are_batched_and_each_answered_correctly(served, engine: Engine) -> None:
    server, app = served
    c = client(server.url)

    def ask(i: int) -> tuple[str, int]:
        reply = c.chat.completions.create(model=MODEL, messages=[user(f"Question {i}?", data_url(
            png_bytes(colour=COLOURS[i])))], max_tokens=8 + i, temperature=1.0, seed=100 + i)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    with spy_on_batches(app) as seen, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, (text, n) in enumerate(answers):
        want = reference(engine, f"Question {i}?", COLOURS[i], max_new_tokens=8 + i, temperature=1.0, seed=100 + i)
        assert (text, n) == (want.text, want.completion_tokens), i
    assert sum(seen["batches"]) == 8 and max(seen["batches"]) > 1  # several requests shared a batch


def test_a_bad_request_is_refused_alone_and_its_batch_mates_answered(served, engine: Engine) -> None:
    server, _ = served
    c = client(server.url)
    too_long = " ".join(["the quick brown fox jumps over the lazy dog"] * 28)  # fits alone, not with 100 more

    def ask(i: int) -> str:
        question = too_long if i == 0 else f"Question {i}?"
        try:
            reply = c.chat.completions.create(model=MODEL, messages=[user(question, data_url(png_bytes()))],
                                              max_tokens=100 if i == 0 else 6, temperature=1.0, seed=i)
        except openai.BadRequestError as exc:
            return f"refused: {exc.message}"
        return reply.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert answers[0].startswith("refused:") and "exceed the model's context of 512 tokens" in answers[0]
    for i in range(1, 4):
        assert answers[i] == reference(engine, f"Question {i}?", COLOURS[0], max_new_tokens=6, temperature=1.0,
                                       seed=i).text


def test_disconnect_mid_stream_ends_the_generation(served) -> None:
    server, app = served
    c = client(server.url)
    with spy_on_batches(app, delay_s=0.02) as seen:
        stream = c.chat.completions.create(model=MODEL, messages=[user("Go on.", data_url(png_bytes()))],
                                           max_tokens=400, temperature=1.0, seed=0, stream=True)
        for n, _ in enumerate(stream):
            if n == 3:
                break
        stream.close()
        assert wait_until(lambda: raw(server.url, "GET", "/health").json()["running"] == 0)
        produced = seen["deltas"]
    assert produced < 200  # the batch ended well before its 400 tokens (about 8 s at this pace)
    after = c.chat.completions.create(model=MODEL, messages=[user("Still there?", data_url(png_bytes()))],
                                      max_tokens=5)
    assert after.usage.completion_tokens == 5


def test_disconnect_while_waiting_for_a_whole_answer_ends_the_generation(served) -> None:
    server, app = served
    body = json.dumps({"model": MODEL, "messages": [user("Go on.", data_url(png_bytes()))], "max_tokens": 400,
                       "seed": 0}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with spy_on_batches(app, delay_s=0.02) as seen:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(head + body)
            assert wait_until(lambda: seen["deltas"] > 0)
        assert wait_until(lambda: raw(server.url, "GET", "/health").json()["running"] == 0)
        produced = seen["deltas"]
    assert produced < 200  # stopped within a poll of the client leaving, not after 400 tokens


def test_explain_route(served) -> None:
    server, _ = served
    reply = post_json(server.url, {"image": data_url(png_bytes()), "question": "What colour is it?"},
                      path="/v1/explain")
    assert reply.status == 200, reply.body
    assert isinstance(reply.json(), dict) and reply.json()
    bad = post_json(server.url, {"image": data_url(png_bytes())}, path="/v1/explain")
    assert bad.status == 400 and "'question' is required" in bad.error


@pytest.fixture(scope="module")
def keyed(saved_model_dir: Path):
    app = create_app(saved_model_dir, ServeSettings(model_name=MODEL, api_key="s3cret"))
    with BackgroundServer(app) as server:
        yield server


def test_api_key(keyed) -> None:
    messages = [user("Hi", data_url(png_bytes()))]
    ok = client(keyed.url, api_key="s3cret").chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert ok.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        client(keyed.url, api_key="wrong").chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(keyed.url, api_key="wrong").models.list()
    missing = post_json(keyed.url, {"model": MODEL, "messages": messages})
    assert missing.status == 401 and "missing API key" in missing.error
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert raw(keyed.url, "GET", "/health").status == 200  # probes need no key


@pytest.fixture(scope="module")
def small_queue(saved_model_dir: Path):
    app = create_app(saved_model_dir, ServeSettings(model_name=MODEL, max_batch_size=1, max_queue=2))
    with BackgroundServer(app) as server:
        yield server, app


def test_full_queue_answers_429_then_serves(small_queue) -> None:
    server, app = small_queue
    worker = app.state.chiasm.worker
    release = threading.Event()
    loop = asyncio.new_event_loop()  # the blocking call's result goes nowhere anyone waits
    worker.submit(Call(loop=loop, fn=lambda: release.wait(30)))
    try:
        assert wait_until(lambda: worker.queue.qsize() == 0)  # the worker is busy with the call
        c = client(server.url)
        messages = [user("Hi", data_url(png_bytes()))]
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(c.chat.completions.create, model=MODEL, messages=messages, max_tokens=3)
                       for _ in range(2)]
            assert wait_until(lambda: worker.queue.qsize() == 2)
            with pytest.raises(openai.RateLimitError, match="2 requests are already waiting"):
                c.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
            release.set()
            assert [f.result().usage.completion_tokens for f in waiting] == [3, 3]
    finally:
        release.set()
        loop.close()
