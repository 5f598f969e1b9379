"""The service's answers other than 200, as exceptions the app turns into {"error": "..."}."""

from __future__ import annotations


class ServiceError(Exception):
    """An answer with `status` and a one-line message saying what is wrong and what to do.

    Args:
        headers: extra response headers (Retry-After on a 503, Connection: close...).
    """

    def __init__(self, message: str, status: int = 500, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


class InputError(ServiceError):
    """Bad input from a client (a 4xx)."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message, status, headers)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready: nobody is left to answer."""
