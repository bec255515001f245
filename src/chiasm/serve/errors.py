"""Errors a client gets back, in the body shape OpenAI's clients parse (``{"error": {...}}``).

A refusal is raised as :class:`ApiError` wherever it is found (parsing, an image, the queue)
and turned into one JSON response in one place, so every 4xx names the problem the same way
and the official clients raise their matching exception class (``BadRequestError``,
``AuthenticationError``, ``RateLimitError``...).
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# HTTP status -> OpenAI's error "type" for it.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 501: "server_error",
          503: "server_error"}


class ApiError(Exception):
    """A request the server refuses (4xx) or cannot serve now (5xx), with the message the client reads."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)
