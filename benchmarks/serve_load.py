"""Load and cold start of ``chiasm serve``: concurrent clients for a while, and launch-to-ready time.

``load``: starts ``chiasm serve MODEL`` on a free loopback port (or uses ``--url``), then runs
``--clients`` threads, each sending chat completions with an image through the official
``openai`` client, back to back, for ``--seconds``. Prints p50/p95 latency (and time to the
first token with ``--stream``), completion tokens per second over the whole run, failures
(refusals, errors, timeouts) and malformed responses (a reply that parsed but breaks the
schema: no text, no usage, more tokens than asked, an unknown finish reason, a stream that
never finished), and writes them as JSON. The server runs in its own process, so the clients'
threads do not share its interpreter.

``cold-start``: the seconds from launching ``chiasm serve MODEL`` to the first ``/health`` 200
(model loading included), ``--repeats`` times.

    python benchmarks/serve_load.py load --model runs/demo/model --clients 16 --seconds 60 --out serve_load.json
    python benchmarks/serve_load.py cold-start --model runs/demo/model --out serve_cold.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

QUESTIONS = ["What colour is the shape?", "How many objects are there?", "Describe the image.",
             "Is there a circle?", "Where is the square?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str, port: int, extra: list[str], *, timeout: float = 300) -> tuple[subprocess.Popen, float]:
    """Start ``chiasm serve`` and wait for ``/health``: the process and the seconds it took."""
    cmd = [sys.executable, "-m", "chiasm.cli", "serve", model, "--port", str(port), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/health"
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"chiasm serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return proc, time.perf_counter() - start
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"chiasm serve did not answer {url} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def image_url(path: str | None) -> str:
    """The image as a data URL: the given file, or a small drawn picture (a red square on white)."""
    if path:
        data = Path(path).read_bytes()
    else:
        from PIL import Image, ImageDraw

        picture = Image.new("RGB", (224, 224), "white")
        ImageDraw.Draw(picture).rectangle((60, 60, 160, 160), fill=(220, 30, 30))
        buf = io.BytesIO()
        picture.save(buf, "PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


@dataclass
class Tally:
    """What all client threads saw (appended under one lock)."""

    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    ok: int = 0
    failures: int = 0
    malformed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def one_request(client, model: str, url: str, question: str, max_tokens: int, stream: bool) -> tuple[int, float | None]:
    """Send one request; its completion tokens and time to first text, or ValueError if the reply is malformed."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    start = time.perf_counter()
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        choice = reply.choices[0] if len(reply.choices) == 1 else None
        if choice is None or not isinstance(choice.message.content, str) or reply.usage is None:
            raise ValueError("no single choice with text and usage")
        check_finish(choice.finish_reason, reply.usage.completion_tokens, max_tokens)
        return reply.usage.completion_tokens, None
    first, finish, usage = None, None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content and first is None:
                first = time.perf_counter() - start
            finish = choice.finish_reason or finish
    if usage is None:
        raise ValueError("stream ended without usage")
    check_finish(finish, usage.completion_tokens, max_tokens)
    return usage.completion_tokens, first


def check_finish(reason: str | None, tokens: int, max_tokens: int) -> None:
    if reason not in ("stop", "length") or not 0 <= tokens <= max_tokens or (reason == "length") != (
            tokens == max_tokens):
        raise ValueError(f"finish_reason {reason!r} with {tokens} of {max_tokens} tokens")


def run_load(url: str, model: str, *, clients: int, seconds: float, max_tokens: int, image: str | None,
             stream: bool) -> dict:
    import openai

    data_url = image_url(image)
    tally, lock = Tally(), threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(k: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("CHIASM_API_KEY", "unused"),
                               max_retries=0, timeout=max(60.0, seconds))
        n = k
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                tokens, first = one_request(client, model, data_url, QUESTIONS[n % len(QUESTIONS)], max_tokens, stream)
            except ValueError:
                with lock:
                    tally.malformed += 1
            except openai.APIError as exc:
                with lock:
                    tally.failures += 1
                    name = type(exc).__name__
                    tally.errors[name] = tally.errors.get(name, 0) + 1
            else:
                with lock:
                    tally.ok += 1
                    tally.latencies.append(time.perf_counter() - start)
                    tally.completion_tokens += tokens
                    if first is not None:
                        tally.first_token.append(first)
            n += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"clients": clients, "seconds": round(elapsed, 2), "max_tokens": max_tokens, "stream": stream,
            "requests_ok": tally.ok, "failures": tally.failures, "malformed": tally.malformed, "errors": tally.errors,
            "latency_p50_s": percentile(tally.latencies, 50), "latency_p95_s": percentile(tally.latencies, 95),
            "first_token_p50_s": percentile(tally.first_token, 50),
            "first_token_p95_s": percentile(tally.first_token, 95),
            "completion_tokens": tally.completion_tokens,
            "tokens_per_s": round(tally.completion_tokens / elapsed, 2) if elapsed else None}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 4)


def server_args(args: argparse.Namespace) -> list[str]:
    extra = ["--served-model-name", "bench", "--max-batch-size", str(args.max_batch_size),
             "--max-queue", str(max(64, args.clients * 2))]
    return extra + (["--device", args.device] if args.device else [])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    load = sub.add_parser("load", help="concurrent clients against a server")
    load.add_argument("--model", help="a saved model folder to serve (not needed with --url)")
    load.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:8000")
    load.add_argument("--served-model-name", default="bench", help="with --url: the model id it serves")
    load.add_argument("--clients", type=int, default=16)
    load.add_argument("--seconds", type=float, default=60)
    load.add_argument("--max-tokens", type=int, default=32)
    load.add_argument("--max-batch-size", type=int, default=8)
    load.add_argument("--image", help="the image every request sends (default: a drawn red square)")
    load.add_argument("--stream", action="store_true", help="stream the answers (and time the first token)")
    load.add_argument("--device")
    load.add_argument("--out", help="write the results here as JSON")
    cold = sub.add_parser("cold-start", help="launch to /health 200")
    cold.add_argument("--model", required=True)
    cold.add_argument("--repeats", type=int, default=3)
    cold.add_argument("--device")
    cold.add_argument("--max-batch-size", type=int, default=8)
    cold.add_argument("--clients", type=int, default=1)
    cold.add_argument("--out")
    args = p.parse_args(argv)

    if args.what == "cold-start":
        times = []
        for _ in range(args.repeats):
            proc, took = launch(args.model, free_port(), server_args(args))
            stop(proc)
            times.append(round(took, 3))
        result = {"what": "cold_start", "model": args.model, "seconds": times, "median_s": statistics.median(times),
                  "target_s": 20.0}
    else:
        if not args.url and not args.model:
            p.error("load: give --model (a server is started) or --url (a running server)")
        proc = None
        url, name = args.url, args.served_model_name
        if not url:
            port = free_port()
            proc, _ = launch(args.model, port, server_args(args))
            url, name = f"http://127.0.0.1:{port}", "bench"
        try:
            result = {"what": "load", "model": args.model or url,
                      **run_load(url, name, clients=args.clients, seconds=args.seconds, max_tokens=args.max_tokens,
                                 image=args.image, stream=args.stream)}
        finally:
            if proc is not None:
                stop(proc)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
