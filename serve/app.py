"""The FastAPI app: `create_app(settings)`; the model is loaded in the lifespan, never at import.

uvicorn serve.app:create_app --factory      # settings from LOTUS_* environment variables
lotus serve runs/compress-.../model.onnx    # the same, from flags
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute

import lotus
from lotus.bench import time_calls
from lotus.checkpoint import latest_run
from serve.admission import Admission, queue_capacity
from serve.batching import Batcher
from serve.errors import ClientGone, ServiceError
from serve.http import METRICS_STATE, REFUSAL_STATE, server_options
from serve.metrics import Metrics
from serve.middleware import AdmissionMiddleware, ApiKeyMiddleware, BodyLimitMiddleware, EarlyRefusal, MetricsMiddleware
from serve.model import ServedModel
from serve.routes import classify, metrics, oip
from serve.schemas import InferenceRequest, validation_message
from serve.service import Service
from serve.settings import Settings

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one


def resolve_model(model: Path | None) -> Path:
    """The model to serve: the given path, or the latest run's exported model.onnx."""
    return model if model is not None else latest_run(containing="model.onnx") / "model.onnx"


def create_app(settings: Settings | None = None, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The service for `settings` (default: read from LOTUS_* environment variables).

    Args:
        on_fatal: called once the model cannot carry on, after readiness turned false (default:
            stop the process, so that its supervisor starts a fresh one).
    """
    settings = settings or Settings()
    app = FastAPI(
        title="LOTUS inference service",
        version=lotus.__version__,
        summary="A compressed Vision Transformer that drops patches on request: Open Inference Protocol v2 and /v1/classify.",
        lifespan=lifespan,
    )
    app.state.service = Service(settings=settings, metrics=Metrics(), on_fatal=on_fatal or stop_process)
    routers = (oip.router, classify.router, metrics.router)
    for router in routers:
        app.include_router(router)
    routes = [route for router in routers for route in router.routes]
    add_middleware(app, app.state.service, routes)
    app.state.early_refusal = EarlyRefusal(app.state.service, routes)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.openapi = lambda: openapi_schema(app)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load and warm the model, size the queue and start the batcher before the first request;
    stop it at shutdown."""
    service: Service = app.state.service
    settings = service.settings
    model = await run_in_threadpool(ServedModel.load, resolve_model(settings.model), settings.threads, settings.spinning)
    seconds_per_image = await run_in_threadpool(time_model, model, settings.max_batch)
    capacity = queue_capacity(settings, seconds_per_image)
    service.admission = Admission(
        capacity, seconds_per_image, service.metrics.queue.set, service.metrics.dropped.labels("queue_full").inc
    )
    batcher = Batcher(
        model.run,
        model.num_patches,
        max_batch=settings.max_batch,
        max_delay_ms=settings.max_delay_ms,
        enabled=settings.batching,
        on_batch=service.metrics.observe_batch,
        on_fatal=lambda reason: fail(service, reason),
    )
    await batcher.start()
    service.model, service.batcher, service.ready = model, batcher, True
    log.info(
        "serving %s as %r (%s, spinning %s, batching %s); queue up to %d images (%.1f ms an image at batch %d)",
        model.path,
        settings.name,
        ", ".join(model.session.get_providers()),
        "on" if settings.spinning else "off",
        f"up to {settings.max_batch} images / {settings.max_delay_ms:g} ms" if settings.batching else "off",
        capacity,
        seconds_per_image * 1000,
        settings.max_batch,
    )
    try:
        # the HTTP protocol counts the answers it gives itself (431, 408), and refuses a crowd's excess (503)
        yield {METRICS_STATE: service.metrics, REFUSAL_STATE: app.state.early_refusal}
    finally:
        service.ready = False
        await batcher.stop()
        service.preprocess.shutdown(wait=False, cancel_futures=True)


def time_model(model: ServedModel, batch: int) -> float:
    """Seconds per image at `batch`, the best of three calls after a warm-up (the first ONNX
    Runtime call is slow: allocations; pay it before accepting traffic)."""
    pixel_values = np.zeros([batch, *model.input_shape[1:]], dtype=np.float32)
    model.run(pixel_values[:1], 0.0)
    return min(time_calls(lambda: model.run(pixel_values, 0.0), runs=3, warmup=1)) / batch


def fail(service: Service, reason: str) -> None:
    """The model cannot carry on: turn readiness false (load balancers stop sending), then stop."""
    service.ready = False
    log.error("the model cannot carry on (%s): not ready; stopping", reason)
    service.on_fatal(reason)


def stop_process(reason: str) -> None:
    """Ask the server to shut down gracefully, as Ctrl-C would; `lotus serve` then exits with
    status 1, so that its supervisor restarts it (uvicorn restarts a worker of --workers N)."""
    FAILURES.append(reason)
    os.kill(os.getpid(), signal.SIGINT)


FAILURES: list[str] = []  # why this process stopped itself, if it did


def add_middleware(app: FastAPI, service: Service, routes: list[BaseRoute]) -> None:
    """Metrics outermost (401s, 413s and 503s are counted too), then the API key, then admission
    to the queue, then the body limits."""
    settings = service.settings
    # Starlette wraps each new middleware around the ones before: add innermost first.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(AdmissionMiddleware, service=service)
    if settings.api_key is not None and settings.api_key.get_secret_value():
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(MetricsMiddleware, metrics=service.metrics, routes=routes)


# Every error is answered as {"error": "..."}, the one shape clients have to parse.


async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, exc.status, headers=exc.headers)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client disconnected: nobody reads the answer; 499 (nginx's "client closed request")
    is what the metrics and the access log record."""
    where = "while sending its body" if isinstance(exc, ClientDisconnect) else "before its answer was ready"
    log.info("client %s disconnected %s (%s %s); its work was dropped", _client(request), where, request.method, request.url.path)
    return Response(status_code=499)


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": validation_message(list(exc.errors()))}, 400)


async def http_error(request: Request, exc: HTTPException) -> Response:
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI reports a form cut short as a 400
        return await client_gone(request, exc.__cause__)
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
    import shutil
    import tempfile

    import uvicorn

    model = resolve_model(settings.model)
    ServedModel.check(model)
    settings = settings.model_copy(update={"model": model})
    os.environ.update(settings_env(settings))
    if settings.workers > 1:  # one folder per port, emptied at start, as prometheus_client requires
        metrics_dir = Path(tempfile.gettempdir()) / f"lotus-metrics-{settings.port}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it shut down for
        uvicorn.run(
            "serve.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=log_level,
            access_log=access_log,
            timeout_graceful_shutdown=10,
            **server_options(settings),
        )
    if FAILURES:
        raise SystemExit(f"error: the model could not carry on ({FAILURES[0]}); exiting for a supervisor to restart the server")
