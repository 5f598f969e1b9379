"""What the routes share: the settings, the model, the batcher, admission and the metrics (on
app.state), and the one way a route runs work: admitted, parsed off the event loop, queued with
a deadline, and dropped when its client goes away."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request

from serve.admission import UPLOAD_GRACE_S, Admission, Ticket
from serve.batching import Batcher, DeadlinePassed
from serve.errors import ClientGone, InputError, ServiceError
from serve.metrics import Metrics
from serve.model import ServedModel
from serve.settings import Settings

log = logging.getLogger("uvicorn.error")

ARRIVAL = "lotus.arrival"  # scope key: time.perf_counter() when the request's headers arrived
TICKET = "lotus.ticket"  # scope key: an infer request's share of the queue (serve.admission.Ticket)


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    on_fatal: Callable[[str], None] = lambda reason: None  # the model cannot carry on
    model: ServedModel | None = None  # set by the lifespan
    batcher: Batcher | None = None
    admission: Admission | None = None
    ready: bool = False
    # Decoding and parsing bodies: a few at once, so their memory is bounded and the event loop free.
    preprocess: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.preprocess = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="lotus-decode")

    def check_model(self, name: str, version: str | None = None) -> ServedModel:
        """The served model if `name` (and `version`, when given) is the one served; 404 otherwise."""
        if name != self.settings.name:
            raise InputError(f"unknown model {name!r}: this server serves {self.settings.name!r}", 404)
        if version is not None and version != self.settings.version:
            raise InputError(
                f"unknown version {version!r} of model {name!r}: this server serves version {self.settings.version!r}", 404
            )
        if not self.ready or self.model is None:
            raise InputError(f"model {name!r} is not ready", 503)
        return self.model

    @staticmethod
    async def read_body(request: Request) -> tuple[bytes, Ticket]:
        """An infer request's body and its share of the queue (taken before routing by
        serve.middleware.AdmissionMiddleware). An upload slower than UPLOAD_GRACE_S gives the
        share back meanwhile: the caller resizes the ticket to the parsed count, which takes it again."""
        ticket: Ticket = request.scope[TICKET]
        reading = asyncio.ensure_future(request.body())
        try:
            done, _ = await asyncio.wait({reading}, timeout=UPLOAD_GRACE_S)
            if not done:
                ticket.release()
            return await reading, ticket
        finally:
            reading.cancel()

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the decode threads: the event loop keeps answering meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.preprocess, fn, *args)

    async def run_model(self, request: Request, pixel_values: np.ndarray, drop: float) -> np.ndarray:
        """(b, 3, H, W) -> (b, classes) logits through the batcher, by the request's deadline.

        504 when the deadline passes first (the work is dropped if the model has not reached it);
        ClientGone when the client disconnects first (likewise).
        """
        deadline = request.scope.get(ARRIVAL, time.perf_counter()) + self.settings.timeout_ms / 1000
        work = asyncio.ensure_future(self.batcher.submit(pixel_values, drop, deadline))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=deadline - time.perf_counter(), return_when="FIRST_COMPLETED")
        finally:
            work.cancel()  # withdraws the request from the queue, if it is still there
            gone.cancel()
        if work in done:
            try:
                return work.result()
            except DeadlinePassed:
                pass
        elif gone in done:
            self.metrics.dropped.labels("client_gone").inc()
            raise ClientGone()
        self.metrics.dropped.labels("deadline").inc()
        raise ServiceError(
            f"the request's deadline of {self.settings.timeout_ms:g} ms (--timeout-ms) passed before it was answered: "
            "retry, or send fewer images",
            504,
        )


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body must have been read: ASGI then has nothing
    else to receive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
