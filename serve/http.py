"""uvicorn's HTTP protocol (httptools) with the two limits it lacks: the size of a request's head
(request line and headers: 431) and the time to receive it (408); and a lingering close, so an
answer given before a request's body was read reaches the client instead of a reset.

Without them one 128 MB header is parsed for seconds on the event loop (stalling every other
request), and a client that sends half a header holds its connection forever. Everything else
(keep-alive timeout, connection cap) is uvicorn's own; `server_options` sets it all.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serve.settings import Settings

LINGER_S = 2.0  # how long a refused request's remaining bytes are read and dropped
# Where those bytes are "read" to: with MSG_TRUNC, Linux drops TCP data without copying it out,
# so the buffer is never written; one serves every connection.
DROPPED = bytearray(1 << 20)
METRICS_STATE = "lotus_metrics"  # the lifespan state key of the app's serve.metrics.Metrics
# the lifespan state key of a serve.middleware.EarlyRefusal: (method, path, headers) -> (route, error) | None
REFUSAL_STATE = "lotus_early_refusal"


@dataclass(frozen=True)
class HeadLimits:
    max_bytes: int  # longest request head; longer: 431
    timeout_s: float  # longest wait for a head once the connection is open or its first byte came; then 408


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that answers 431 once a request's head passes `limits.max_bytes`
    (counted as it arrives, before the parser gathers it) and 408 when the head is not complete
    within `limits.timeout_s`; a connection that sends nothing is closed then."""

    def __init__(self, *args: Any, limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.head_bytes = 0
        self.awaiting_head = True  # the next byte starts a request
        self.in_head = False
        self.refused = False
        self.head_timer: asyncio.TimerHandle | None = None
        self.dropping: socket.socket | None = None  # a refused request's socket, drained by `_drop`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self.head_timer = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def data_received(self, data: bytes) -> None:
        if self.refused:  # the rest of a refused request: read and dropped, so the client sees the answer
            return
        if self.awaiting_head:
            self.awaiting_head, self.in_head, self.head_bytes = False, True, 0
            if self.head_timer is None:  # a keep-alive connection's next request
                self._start_head_timer()
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if self.in_head and self.head_bytes > self.limits.max_bytes and not self.transport.is_closing():
            self._refuse(
                431, f"the request's headers are over the limit of {self.limits.max_bytes / 1000:g} KB (--max-header-kb)"
            )

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._stop_head_timer()
        if self._refused_early():
            return
        super().on_headers_complete()
        if self.cycle is not None and not isinstance(self.cycle.transport, _LingeringClose):
            self.cycle.transport = _LingeringClose(self)  # type: ignore[assignment]

    def _refused_early(self) -> bool:
        """Answer now, before the body or the app, when the app's hook refuses the request (never
        while an earlier request's answer on this connection is still being given: a pipelined
        request goes the app's way, in its turn)."""
        refusal = self.app_state.get(REFUSAL_STATE)
        method = self.parser.get_method().decode("ascii")
        if refusal is None or method != "POST" or (self.cycle is not None and not self.cycle.response_complete):
            return False
        path = urllib.parse.unquote(httptools.parse_url(self.url).path.decode("ascii"))
        refused = refusal(method, path, self.headers)
        if refused is None:
            return False
        route, error = refused
        self._refuse(error.status, str(error), error.headers or {}, route, method)
        return True

    def on_body(self, body: bytes) -> None:
        if not self.refused:  # the rest of a refused request's body is dropped
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.awaiting_head = True
        if not self.refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        if self.dropping is not None:  # the transport must not read (and copy) what `_drop` drops
            self.server_state.total_requests += 1
            return
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_dropping()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.in_head:
            self._refuse(408, f"the request's headers did not arrive within {self.limits.timeout_s:g} s (--header-timeout-s)")
        elif self.awaiting_head and self.cycle is None:  # connected and never sent a byte
            self.transport.close()

    def _refuse(
        self, status: int, message: str, headers: dict[str, str] | None = None, route: str = "other", method: str = "-"
    ) -> None:
        """Answer `status` with {"error": message} (and `headers`), count it, and close (lingering)."""
        if status < 500:  # the client's fault; overload (503) is counted in the metrics, not logged per request
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            self.logger.info("%s %d: %s", client, status, message)
        metrics = self.app_state.get(METRICS_STATE)
        if metrics is not None:  # answered before the app: counted here
            metrics.requests.labels(route, method, str(status)).inc()
        body = json.dumps({"error": message}).encode()
        head = [STATUS_LINE[status], *(n + b": " + v + b"\r\n" for n, v in self.server_state.default_headers)]
        head += [f"{name.lower()}: {value}\r\n".encode() for name, value in (headers or {}).items()]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.in_head = False
        self.linger()

    def linger(self) -> None:
        """Close once the answer is out, without resetting the connection.

        Closing a socket with unread data in it resets the connection, and a client still sending
        would see the reset instead of the answer (a 413, 401 or 503 given before the body was
        read). So our side is shut, what the client still sends is read and dropped for LINGER_S
        (or until the client closes), and then the connection is closed (nginx's lingering close).
        On Linux the dropped bytes are not even copied out of the kernel, which under a crowd of
        refused uploads is event-loop time the other requests wait for."""
        self.refused = True
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self._close)
        sock = self.transport.get_extra_info("socket")
        self.dropping = _duplicate(sock) if sys.platform == "linux" and sock is not None else None
        if self.dropping is None:  # read by the transport, dropped by data_received
            self.flow.resume_reading()
            return
        self.flow.pause_reading()
        self.loop.add_reader(self.dropping.fileno(), self._drop)

    def _drop(self) -> None:
        """Drop what the socket holds; close once the client has closed its side."""
        try:
            while self.dropping.recv_into(DROPPED, len(DROPPED), socket.MSG_TRUNC):
                pass
        except BlockingIOError:
            return
        except OSError:  # reset by the client
            pass
        self._close()

    def _stop_dropping(self) -> None:
        if self.dropping is not None:
            self.loop.remove_reader(self.dropping.fileno())
            self.dropping.close()  # only the duplicate: the transport's socket stays open
            self.dropping = None

    def _close(self) -> None:
        self._stop_dropping()
        self.transport.close()


def _duplicate(sock: Any) -> socket.socket | None:
    """A socket of our own on the transport's connection (None when out of file descriptors)."""
    try:
        return sock.dup()
    except OSError:
        return None


class _LingeringClose:
    """The connection as a request's response sees it: a close while the request's body is
    still coming lingers (LimitedHttpToolsProtocol.linger) instead of resetting the connection."""

    def __init__(self, protocol: LimitedHttpToolsProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def close(self) -> None:
        cycle = self._protocol.cycle
        if cycle is not None and cycle.more_body and not self._transport.is_closing():
            self._protocol.linger()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the settings' HTTP limits."""
    limits = HeadLimits(max_bytes=settings.max_header_bytes, timeout_s=settings.header_timeout_s)
    return {
        "http": functools.partial(LimitedHttpToolsProtocol, limits=limits),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
    }
