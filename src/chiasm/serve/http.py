"""What every ``/v1`` request goes through before its route: the API key, and a bounded JSON body.

The body is read chunk by chunk and refused as soon as it passes the limit, whatever the
Content-Length header claims (a chunked upload has none), so a client cannot make the server
hold more than ``max_body_bytes`` of it in memory.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.requests import Request

from chiasm.serve.errors import ApiError, bad_request


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (when a key is set)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body: 415 for another content type, 413 past ``max_bytes``, 400 if malformed."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {media or 'none'!r}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise _too_large(max_bytes) if declared.isdigit() else bad_request("malformed Content-Length header")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise bad_request(f"malformed JSON: {exc}") from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {max_bytes} bytes "
                         "(images included; send smaller images)", code="request_too_large")
