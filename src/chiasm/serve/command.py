"""``chiasm serve MODEL``: the command's options and the uvicorn run.

Building the parser imports nothing of the server (the web packages are an optional extra),
so ``chiasm --help`` works without them; running the command says how to install them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chiasm.serve.settings import MIB, ServeSettings

API_KEY_ENV = "CHIASM_API_KEY"


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = ServeSettings()
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a saved model")
    s.add_argument("model", help="a saved model folder (e.g. runs/demo/model)")
    s.add_argument("--host", default=d.host, help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=d.port)
    s.add_argument("--served-model-name", help="the model id clients send (default: MODEL as given)")
    s.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set, "
                                     "else no key; the environment keeps it out of the process list)")
    s.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="requests generated together")
    s.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting beyond those running; "
                                                                      "more get 429")
    s.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a batch waits for more requests to join it")
    s.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MIB, help="one request's body")
    s.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / MIB, help="one image's encoded size")
    s.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="one image's width x height")
    s.add_argument("--max-images-per-message", type=int, default=d.max_images_per_message)
    s.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request)
    s.add_argument("--max-messages", type=int, default=d.max_messages, help="messages in one request")
    s.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections at once; more are answered 503")
    s.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                   help="the largest max_tokens a client may ask for")
    s.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="max_tokens when a client sends none (lowered to what the context leaves)")
    s.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (the server then makes requests wherever clients say)")
    s.add_argument("--image-folder", help="allow local image paths, only inside this folder")
    s.set_defaults(func=run_serve)
    return s  # the caller adds the model-loading options (--device, --dtype) shared with other commands


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        host=args.host, port=args.port, model_name=args.served_model_name,
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, batch_wait_ms=args.batch_wait_ms,
        max_body_bytes=int(args.max_body_mb * MIB), max_image_bytes=int(args.max_image_mb * MIB),
        max_image_pixels=args.max_image_pixels, max_images_per_message=args.max_images_per_message,
        max_images_per_request=args.max_images_per_request, max_connections=args.max_connections,
        max_messages=args.max_messages, max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, allow_remote_images=args.allow_remote_images,
        image_folder=Path(args.image_folder) if args.image_folder else None, device=args.device, dtype=args.dtype)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)  # option errors before the model loads
    try:
        import uvicorn

        from chiasm.serve.app import create_app
    except ImportError as exc:
        print(f"chiasm: error: chiasm serve needs the 'serve' extra ({exc}); install it with "
              "pip install 'chiasm[serve]'", file=sys.stderr)
        return 2
    app = create_app(args.model, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", **settings.uvicorn_options())
    return 0
