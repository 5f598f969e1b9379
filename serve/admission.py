"""Backpressure: a bound on the images admitted and not yet answered.

A request is checked against the bound as soon as its headers are in (its image count estimated
from Content-Length): when the queue has no room for it, it gets a 503 at once, with a
Retry-After that says when the work ahead of it should be done, and its body is never read. Once
its body is parsed, it is admitted for its real image count (or refused then). So the service
never holds more work than it can finish in a few seconds, a crowd is told to come back instead
of waiting in line, and a client uploading slowly holds no share of the queue while it uploads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from serve.errors import ServiceError


def estimate_images(content_length: bytes | None, img_size: int, max_images: int) -> int:
    """The images an infer request holds, estimated before its body is read: as many as its
    Content-Length would hold as binary FP32 (JSON numbers take more bytes, so this rarely
    under-counts; the count is corrected once the body is parsed)."""
    image_bytes = 3 * img_size * img_size * 4
    if content_length is None or not content_length.isdigit():
        return 1
    return min(max_images, max(1, int(content_length) // image_bytes))


class Admission:
    """Counts admitted images against `capacity`.

    Args:
        capacity: most images admitted at once (an empty queue admits any one request).
        seconds_per_image: the model's measured time per image, for Retry-After.
        on_change: called with the admitted image count whenever it changes (a gauge).
        on_reject: called on every 503 (a counter).
    """

    def __init__(
        self,
        capacity: int,
        seconds_per_image: float,
        on_change: Callable[[int], None] = lambda images: None,
        on_reject: Callable[[], None] = lambda: None,
    ):
        self.capacity = capacity
        self.seconds_per_image = seconds_per_image
        self.on_change = on_change
        self.on_reject = on_reject
        self.images = 0

    def retry_after(self) -> int:
        """Whole seconds until the admitted work should be done (at least 1)."""
        return max(1, math.ceil(self.images * self.seconds_per_image))

    def check(self, images: int) -> None:
        """Raise the 503 now if `images` more would not fit (an empty queue takes any request)."""
        if self.images and self.images + images > self.capacity:
            self.on_reject()
            raise ServiceError(
                f"the server is at capacity ({self.images} images queued, limit {self.capacity}: --max-queue-images); "
                "retry after the time in Retry-After",
                503,
                {"Retry-After": str(self.retry_after())},
            )

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Hold `images` of the capacity for the block, or raise the 503 at once."""
        self.check(images)
        self.images += images
        self.on_change(self.images)
        try:
            yield
        finally:
            self.images -= images
            self.on_change(self.images)
