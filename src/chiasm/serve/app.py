"""The ASGI application: ``create_app(model folder or model, settings)``; run it with any ASGI server.

The model loads (and the worker thread starts) before the app is returned, so a server
started with it answers ``/health`` only once it can answer a completion; the worker stops
with the app's lifespan. Every refusal leaves through one handler as an OpenAI error body,
and so does an unexpected exception (a 500 whose traceback goes to the log, not to the client).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chiasm.generation import Engine
from chiasm.model import VisionLanguageModel
from chiasm.serve import routes
from chiasm.serve.errors import ApiError
from chiasm.serve.routes import ClientGone, ServerState
from chiasm.serve.settings import ServeSettings
from chiasm.serve.worker import ModelWorker

log = logging.getLogger(__name__)


def create_app(model: str | Path | VisionLanguageModel, settings: ServeSettings | None = None) -> Starlette:
    """An app serving ``model`` (a saved model folder, or a model already loaded) under ``settings``."""
    settings = settings or ServeSettings()
    if isinstance(model, VisionLanguageModel):
        name = settings.model_name or model.config.lm.source
        if settings.device is not None:
            model.to(settings.device)
    else:
        name = settings.model_name or str(model)
        model = VisionLanguageModel.load(model, device=settings.device, dtype=settings.dtype)
    model.eval()
    worker = ModelWorker(Engine(model, max_batch_size=settings.max_batch_size),
                         max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                         batch_wait_ms=settings.batch_wait_ms, default_max_tokens=settings.default_max_tokens)
    state = ServerState(settings=settings, model_name=name, worker=worker, model=model)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        log.info("serving %s with %s", name, settings.describe())
        try:
            yield
        finally:
            worker.stop()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/models", routes.list_models, methods=["GET"]),
            Route("/v1/explain", routes.explain_route, methods=["POST"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/", routes.index, methods=["GET"]),
            Route("/static/{path:path}", routes.static, methods=["GET"]),
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, ClientGone: _client_gone,
                            Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.chiasm = state
    return app


async def _api_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in the same body shape as ours."""
    assert isinstance(exc, HTTPException)
    messages = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    error = ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=dict(exc.headers or {}))
    return error.response()


async def _client_gone(request: HttpRequest, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; the job was cancelled


async def _internal_error(request: HttpRequest, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    body = ApiError(500, "internal server error (see the server's log)", code="internal_error").body()
    return JSONResponse(body, status_code=500)
