"""Pure ASGI middleware (cheap per request): metrics, the API key, the body size limit.

Order, outermost first: metrics (so 401s and 413s are counted too), then the API key (an
unauthenticated client never gets a body read), then the body limit.
"""

from __future__ import annotations

import hmac
import time

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.metrics import Metrics

PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def route_template(scope: Scope) -> str:
    """The matched route's path template (/v2/models/{name}/infer), so metric labels stay few."""
    route = scope.get("route")
    if route is None:  # answered before routing (401, 413): match it now
        for candidate in scope["app"].router.routes:
            if candidate.matches(scope)[0] is Match.FULL:
                route = candidate
                break
    return getattr(route, "path", "other")


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_template(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class ApiKeyMiddleware:
    """Requires 'Authorization: Bearer KEY' on every path but the health checks."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            error = "missing API key: send 'Authorization: Bearer KEY'" if not given else "wrong API key"
            response = JSONResponse({"error": error}, 401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the streamed body passes the limit; FastAPI lets HTTPExceptions
    through its body parsing, so it reaches the error handler as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit / 1e6:g} MB (--max-body-mb)")


class BodyLimitMiddleware:
    """413 when Content-Length says the body is over the limit (before reading it), or when the
    bytes streamed in pass it (chunked uploads, or a Content-Length that lies)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = BodyTooLarge(self.max_bytes).detail if length.isdigit() else "Content-Length is not a number"
            response = JSONResponse({"error": error}, 413 if length.isdigit() else 400, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:  # read outside FastAPI's handlers (e.g. by another middleware)
            if started:
                raise
            await JSONResponse({"error": e.detail}, 413, headers={"Connection": "close"})(scope, receive, send)
