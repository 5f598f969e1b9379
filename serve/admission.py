"""Backpressure: a bound on the images admitted and not yet answered.

An inference request takes its share of the queue as soon as its headers are in (its image count
estimated from Content-Length); when the queue has no room for it, it gets a 503 at once, with a
Retry-After that says when the work ahead of it should be done, and its body is never read. Once
its body is parsed, its share becomes its real image count (or it is refused then). An upload
slower than UPLOAD_GRACE_S gives its share back while it goes on, and takes it again (or is
refused) once parsed, so slow clients cannot hold the queue. So the service never holds more
work than it can finish in a few seconds, and a crowd is told to come back at once instead of
waiting in line.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from serve.errors import ServiceError
from serve.settings import Settings

UPLOAD_GRACE_S = 1.0  # an upload still going after this gives its share of the queue back meanwhile
QUEUE_SECONDS = 2.0  # the default queue holds at most this much of the model's work


def queue_capacity(settings: Settings, seconds_per_image: float) -> int:
    """Images the queue admits: --max-queue-images, or else QUEUE_SECONDS of the model's work and
    at most half the deadline's, never fewer than one request's max_images. Half, because the time
    per image is measured on an idle machine at startup, and under a crowd the same cores also
    read, parse and refuse requests: a queue holding the whole deadline's work would see its last
    admitted requests time out."""
    if settings.max_queue_images is not None:
        return settings.max_queue_images
    seconds = min(QUEUE_SECONDS, settings.timeout_ms / 1000 / 2)
    return max(settings.max_images, round(seconds / seconds_per_image))


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

    def admit(self, images: int) -> Ticket:
        """Hold `images` of the capacity until the ticket is released, or raise the 503 at once."""
        self.check(images)
        self._add(images)
        return Ticket(self, images)

    def _add(self, images: int) -> None:
        self.images += images
        self.on_change(self.images)


class Ticket:
    """An admitted request's share of the queue; a context manager that releases it."""

    def __init__(self, admission: Admission, images: int):
        self.admission = admission
        self.images = images

    def resize(self, images: int) -> None:
        """Hold `images` instead (the parsed count): the 503 when a larger count does not fit."""
        self.release()
        self.admission.check(images)
        self.admission._add(images)
        self.images = images

    def release(self) -> None:
        self.admission._add(-self.images)
        self.images = 0

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
