"""What an operator sets for a server: address, batching, queue, limits and what images may come from.

Every limit has a default that keeps one client from taking the server down (memory, time,
the model's context), and each is checked once here, at start-up, so that a wrong value fails
with the option's name before the model loads rather than as a strange refusal later.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from PIL import Image

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """Options of ``chiasm serve`` (the command's flags carry the same names with dashes)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None          # the id clients send as "model"; None: the model folder as given
    api_key: str | None = None             # None: no key needed; else "Authorization: Bearer KEY" on /v1/*
    max_batch_size: int = 8                # requests generated together in one batched run
    max_queue: int = 64                    # requests waiting for the model beyond those running; then 429
    batch_wait_ms: float = 5.0             # how long a new batch waits for more requests to join it
    max_body_bytes: int = 20 * MIB         # one HTTP request body (images travel base64 inside it)
    max_image_bytes: int = 10 * MIB        # one image's encoded bytes
    max_image_pixels: int = 4096 * 4096    # one image's width x height, read from its header before decoding
    max_images_per_message: int = 4
    max_images_per_request: int = 8
    max_messages: int = 256
    max_connections: int = 256             # open connections and requests at once; more get 503 from uvicorn
    max_tokens_limit: int = 4096           # the largest max_tokens a client may ask for
    default_max_tokens: int = 256          # when the client sends none (the context may lower it)
    allow_remote_images: bool = False      # fetch http(s) image URLs
    remote_timeout_s: float = 10.0
    image_folder: Path | None = None       # local image paths (file:// or plain) allowed only inside it
    device: str | None = None              # where the model runs (e.g. cuda); None: where it loads (cpu)
    dtype: str | None = None               # the LM's weights dtype; None: as saved

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "max_queue", "max_body_bytes", "max_image_bytes", "max_image_pixels",
                    "max_images_per_message", "max_images_per_request", "max_messages", "max_connections",
                    "max_tokens_limit", "default_max_tokens", "remote_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"serve option {_flag(name)}: must be > 0, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"serve option {_flag('batch_wait_ms')}: must be >= 0, got {self.batch_wait_ms}")
        if Image.MAX_IMAGE_PIXELS is not None and self.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"serve option --max-image-pixels: {self.max_image_pixels} is over Pillow's own limit "
                             f"of {Image.MAX_IMAGE_PIXELS}, which refuses larger images first")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve option --port: must be in 0..65535, got {self.port}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"serve option --default-max-tokens ({self.default_max_tokens}) is over "
                             f"--max-tokens-limit ({self.max_tokens_limit})")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("serve option --api-key: empty; leave it out to serve without a key")
        if self.image_folder is not None:
            folder = Path(self.image_folder)
            if not folder.is_dir():
                raise ValueError(f"serve option --image-folder: {folder} is not a folder")
            object.__setattr__(self, "image_folder", folder.resolve())

    def uvicorn_options(self) -> dict:
        """What uvicorn itself enforces: every connection (and the body it may be sending) costs memory."""
        return {"limit_concurrency": self.max_connections, "timeout_keep_alive": 5, "timeout_graceful_shutdown": 10}

    def describe(self) -> dict:
        """The settings as logged at start-up (the key itself never appears)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["api_key"] = "set" if self.api_key else None
        out["image_folder"] = str(self.image_folder) if self.image_folder else None
        return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
