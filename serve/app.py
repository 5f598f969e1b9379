"""The FastAPI app: `create_app(settings)`; the model is loaded in the lifespan, never at import.

uvicorn serve.app:create_app --factory      # settings from LOTUS_* environment variables
lotus serve runs/compress-.../model.onnx    # the same, from flags
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import lotus
from serve.batching import Batcher
from serve.metrics import Metrics
from serve.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from serve.model import InputError, ServedModel
from serve.routes import classify, metrics, oip
from serve.schemas import InferenceRequest, validation_message
from serve.service import Service
from serve.settings import Settings

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one


def resolve_model(model: Path | None) -> Path:
    """The model to serve: the given path, or the latest run's exported model.onnx."""
    if model is not None:
        return model
    from lotus.checkpoint import latest_run  # imports torch: only when no model is named

    return latest_run(containing="model.onnx") / "model.onnx"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for `settings` (default: read from LOTUS_* environment variables)."""
    settings = settings or Settings()
    app = FastAPI(
        title="LOTUS inference service",
        version=lotus.__version__,
        summary="A compressed Vision Transformer that drops patches on request: Open Inference Protocol v2 and /v1/classify.",
        lifespan=lifespan,
    )
    app.state.service = Service(settings=settings, metrics=Metrics())
    app.include_router(oip.router)
    app.include_router(classify.router)
    app.include_router(metrics.router)
    add_middleware(app, settings, app.state.service.metrics)
    app.add_exception_handler(InputError, input_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.openapi = lambda: openapi_schema(app)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load and warm the model and start the batcher before the first request; stop it at shutdown."""
    service: Service = app.state.service
    settings = service.settings
    model = await run_in_threadpool(ServedModel.load, resolve_model(settings.model), settings.threads, settings.spinning)
    # The first ONNX Runtime call is slow (allocations); pay it before accepting traffic.
    await run_in_threadpool(model.run, np.zeros([1, *model.input_shape[1:]], dtype=np.float32), 0.0)
    batcher = Batcher(
        model.run,
        model.num_patches,
        max_batch=settings.max_batch,
        max_delay_ms=settings.max_delay_ms,
        enabled=settings.batching,
        on_batch=service.metrics.observe_batch,
    )
    await batcher.start()
    service.model, service.batcher, service.ready = model, batcher, True
    log.info(
        "serving %s as %r (%s, spinning %s, batching %s)",
        model.path,
        settings.name,
        ", ".join(model.session.get_providers()),
        "on" if settings.spinning else "off",
        f"up to {settings.max_batch} images / {settings.max_delay_ms:g} ms" if settings.batching else "off",
    )
    try:
        yield
    finally:
        service.ready = False
        await batcher.stop()


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Metrics outermost (401s and 413s are counted too), then the API key, then the body limit."""
    # Starlette wraps each new middleware around the ones before: add innermost first.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None and settings.api_key.get_secret_value():
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(MetricsMiddleware, metrics=metrics)


# Every error is answered as {"error": "..."}, the one shape clients have to parse.


async def input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, exc.status)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": validation_message(list(exc.errors()))}, 400)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, 500)


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, plus the infer request body: the route reads its body itself (JSON or
    binary tensors), so FastAPI cannot see it."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        request_schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(request_schema.pop("$defs", {}))
        components["InferenceRequest"] = request_schema
        app.openapi_schema = schema
    return app.openapi_schema


def settings_env(settings: Settings) -> dict[str, str]:
    """`settings` as the LOTUS_* environment variables that `Settings()` reads back."""
    env = {}
    for field, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"LOTUS_{field.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def run_server(settings: Settings, log_level: str = "info", access_log: bool = True) -> None:
    """Serve with uvicorn until interrupted (`lotus serve`).

    The model is checked here first, so a wrong path is one line, not a worker's traceback.
    Every worker process builds its app from the environment (`create_app` as a factory); under
    several workers /metrics adds up all of them (prometheus_client's multiprocess mode).
    """
    import os
    import tempfile

    import uvicorn

    model = resolve_model(settings.model)
    ServedModel.check(model)
    settings = settings.model_copy(update={"model": model})
    os.environ.update(settings_env(settings))
    with tempfile.TemporaryDirectory(prefix="lotus-metrics-") as metrics_dir:
        if settings.workers > 1:
            os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
        uvicorn.run(
            "serve.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=log_level,
            access_log=access_log,
            timeout_graceful_shutdown=10,
        )
