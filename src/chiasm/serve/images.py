"""Image URLs of a chat request -> decoded RGB images, within the operator's limits.

``data:`` URLs (base64) are always accepted. An http(s) URL makes the server fetch from wherever
the client says, and a path reads the server's disk, so both are refused unless the operator
enabled them (``--allow-remote-images``, ``--image-folder``); a path must then resolve, symlinks
followed, inside that folder. Sizes are checked before work: the base64 length before decoding
it, the pixel count from the image header before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image

from chiasm.data.images import decode_image
from chiasm.data.sample import DataError
from chiasm.serve.errors import ApiError, bad_request
from chiasm.serve.settings import ServeSettings

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def load_image_url(url: str, settings: ServeSettings, *, where: str) -> Image.Image:
    """Decode the image ``url`` points at; ``where`` (e.g. "messages[1].content[0]") names it in errors."""
    param = f"{where}.image_url.url"
    if url[:5].lower() == "data:":
        data = _data_url_bytes(url, settings, param)
    elif url[:7].lower() in ("http://", "https:/"):
        data = _fetch(url, settings, param)
    else:
        data = _read_local(url, settings, param)
    try:
        return decode_image(data, describe=where, max_pixels=settings.max_image_pixels)
    except DataError as exc:
        raise bad_request(f"{param}: not a usable image: {exc}", param, "invalid_image") from exc


def _data_url_bytes(url: str, settings: ServeSettings, param: str) -> bytes:
    head = _DATA_URL.match(url)
    if head is None:
        raise bad_request(f"{param}: malformed data URL; expected data:image/<type>;base64,<data>", param)
    if not head.group("b64"):
        raise bad_request(f"{param}: data URL is not base64 (add ;base64)", param)
    mime = (head.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise bad_request(f"{param}: data URL has media type {mime!r}, not an image", param, "invalid_image")
    payload = url[head.end():]
    # 4 base64 characters carry 3 bytes: refuse an oversized image before decoding a byte of it.
    if len(payload) * 3 // 4 > settings.max_image_bytes + 2:
        raise _too_big(param, len(payload) * 3 // 4, settings)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{param}: invalid base64 in data URL: {exc}", param, "invalid_image") from exc
    if len(data) > settings.max_image_bytes:
        raise _too_big(param, len(data), settings)
    return data


def _fetch(url: str, settings: ServeSettings, param: str) -> bytes:
    if not settings.allow_remote_images:
        raise ApiError(403, f"{param}: remote image URLs are disabled on this server; send the image as a "
                            "base64 data: URL (the operator can enable them with --allow-remote-images)",
                       param=param, code="remote_images_disabled")
    request = urllib.request.Request(url, headers={"User-Agent": "chiasm-serve"})
    try:
        with urllib.request.urlopen(request, timeout=settings.remote_timeout_s) as reply:
            data = reply.read(settings.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise bad_request(f"{param}: cannot fetch the image: {exc}", param, "image_fetch_failed") from exc
    if len(data) > settings.max_image_bytes:
        raise _too_big(param, len(data), settings)
    return data


def _read_local(url: str, settings: ServeSettings, param: str) -> bytes:
    folder = settings.image_folder
    if folder is None:
        raise ApiError(403, f"{param}: local image paths are disabled on this server; send the image as a "
                            "base64 data: URL (the operator can allow a folder with --image-folder)",
                       param=param, code="local_images_disabled")
    if url[:7].lower() == "file://":
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"{param}: file URL names host {parsed.netloc!r}; only local files", param)
        raw = urllib.parse.unquote(parsed.path)
    elif re.match(r"[a-z][a-z0-9+.-]*://", url, re.IGNORECASE):
        raise bad_request(f"{param}: unsupported URL scheme; use data:, http(s):, file: or a path", param)
    else:
        raw = url
    if "\x00" in raw:
        raise bad_request(f"{param}: path holds a NUL character", param)
    path = (folder / raw).resolve()  # an absolute raw path replaces the folder; checked below
    if not path.is_relative_to(folder):
        raise ApiError(403, f"{param}: {raw!r} is outside the image folder this server reads", param=param,
                       code="path_outside_image_folder")
    if not path.is_file():
        raise bad_request(f"{param}: no image file {raw!r} in the image folder", param, "image_not_found")
    size = path.stat().st_size
    if size > settings.max_image_bytes:
        raise _too_big(param, size, settings)
    return path.read_bytes()


def _too_big(param: str, size: int, settings: ServeSettings) -> ApiError:
    return ApiError(413, f"{param}: image of {size} bytes is over this server's limit of {settings.max_image_bytes} "
                         "bytes", param=param, code="image_too_large")
