"""Pure ASGI middleware (cheap per request): metrics, the API key, the body's size and time limits.

Order, outermost first: metrics (so 401s, 413s and 503s are counted too), then the API key (an
unauthenticated client never gets a body read), then admission to the queue, then the body
limits. An answer given before
the body is read says `Connection: close`: the rest of the body is never read, so the
connection cannot carry another request.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.admission import estimate_images
from serve.errors import ServiceError
from serve.metrics import Metrics
from serve.service import ARRIVAL, TICKET, Service

PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The matched route's path template (/v2/models/{name}/infer), so metric labels stay few.

    Answers given before routing (401, 413) are matched against `routes` here.
    """
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", "other")


class MetricsMiddleware:
    """Counts every request by route template, method and status, and times it.

    Args:
        routes: the service's routes (its routers' own: the app's may be wrapped).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = scope[ARRIVAL] = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_template(scope, self.routes)
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
        if not authorized(given, self.key):
            error = "missing API key: send 'Authorization: Bearer KEY'" if not given else "wrong API key"
            headers = {"WWW-Authenticate": "Bearer", **close_unread_body(scope)}
            return await JSONResponse({"error": error}, 401, headers=headers)(scope, receive, send)
        await self.app(scope, receive, send)


def authorized(authorization: bytes, key: bytes) -> bool:
    """Whether an Authorization header's value is 'Bearer KEY' (compared in constant time)."""
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class AdmissionMiddleware:
    """Gives every inference request its share of the queue (serve.admission) before routing and
    before its body is read: a 503 at once when there is no room. An infer request's ticket goes
    to its route (scope["lotus.ticket"]) to resize once the body is parsed; /v1/classify is only
    checked here (its upload is read before the route runs) and admitted once decoded."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.service
        if not (scope["type"] == "http" and scope["method"] == "POST" and service.ready and is_inference(scope["path"])):
            return await self.app(scope, receive, send)
        try:
            if scope["path"] == CLASSIFY:
                service.admission.check(1)
                return await self.app(scope, receive, send)
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            ticket = service.admission.admit(estimate_images(length, service.model.img_size, service.settings.max_images))
        except ServiceError as e:  # the body is not read: the connection cannot carry another request
            return await JSONResponse({"error": str(e)}, e.status, headers={**e.headers, **CLOSE})(scope, receive, send)
        scope[TICKET] = ticket
        with ticket:
            await self.app(scope, receive, send)


class EarlyRefusal:
    """AdmissionMiddleware's 503, decided by the HTTP protocol (serve.http) the moment a request's
    head is parsed: a refused request then costs no buffered body, no task and no trip through
    the app. Under a crowd the refusals queue behind each other on the event loop, so their cost
    is the crowd's 503 latency: for 0.8 MB uploads it fell from about 1 ms to 0.6 ms a refusal,
    most of what is left being the reading of the body that the lingering close drops.

    Called with the request's method, path and headers; returns the metrics' route label and the
    error, or None when the request goes on to the app (which admits it). An unauthenticated
    request goes on too: its answer is the API key's 401, not the queue's state.

    Args:
        routes: the service's routes, for the metrics' route label.
    """

    def __init__(self, service: Service, routes: Sequence[BaseRoute]) -> None:
        self.service = service
        self.routes = routes
        key = service.settings.api_key
        self.key = key.get_secret_value().encode() if key is not None and key.get_secret_value() else None

    def __call__(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[str, ServiceError] | None:
        service = self.service
        if method != "POST" or not service.ready or not is_inference(path):
            return None
        if self.key is not None and not authorized(next((v for k, v in headers if k == b"authorization"), b""), self.key):
            return None
        length = next((v for k, v in headers if k == b"content-length"), None)
        images = 1 if path == CLASSIFY else estimate_images(length, service.model.img_size, service.settings.max_images)
        try:
            service.admission.check(images)
        except ServiceError as e:
            return route_template({"type": "http", "path": path, "method": method}, self.routes), e
        return None


CLASSIFY = "/v1/classify"


def is_inference(path: str) -> bool:
    return path == CLASSIFY or (path.startswith("/v2/models/") and path.endswith("/infer"))


def close_unread_body(scope: Scope) -> dict[str, str]:
    """`Connection: close` when the request has a body that will not be read."""
    has_body = any(k == b"content-length" and v != b"0" or k == b"transfer-encoding" for k, v in scope["headers"])
    return {"Connection": "close"} if has_body else {}


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the streamed body passes the limit; FastAPI lets HTTPExceptions
    through its body parsing, so it reaches the error handler as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit / 1e6:g} MB (--max-body-mb)", CLOSE)


class BodyTimeout(HTTPException):
    """Raised from `receive` when the next part of the body does not come in time (a client
    that stalled, or a slow-body attack holding the connection)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body stalled: no data for {seconds:g} s (--body-timeout-s)", CLOSE)


CLOSE = {"Connection": "close"}


class BodyLimitMiddleware:
    """413 when Content-Length says the body is over the limit (before reading it), or when the
    bytes streamed in pass it (chunked uploads, or a Content-Length that lies); 408 when the body
    stalls for `timeout_s` between parts."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = BodyTooLarge(self.max_bytes).detail if length.isdigit() else "Content-Length is not a number"
            response = JSONResponse({"error": error}, 413 if length.isdigit() else 400, headers=CLOSE)
            return await response(scope, receive, send)
        received = 0
        more_body = True
        started = False

        async def limited_receive() -> Message:
            nonlocal received, more_body
            if not more_body:  # the body is in: what comes now is the disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more_body = message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as e:  # read outside FastAPI's handlers (e.g. by another middleware)
            if started:
                raise
            await JSONResponse({"error": e.detail}, e.status_code, headers=CLOSE)(scope, receive, send)
