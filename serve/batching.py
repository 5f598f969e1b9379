"""Dynamic batching: concurrent requests share one ONNX Runtime call.

Whenever the model is free, every queued request is taken. When requests have been overlapping
(the previous round gathered more than one), the round also waits for company until `max_batch`
images or `max_delay` after its oldest request (as Triton's max_queue_delay counts); a lone
client is never delayed. Under load, the requests that arrive while the model runs form the
next round. A round is split into calls of at most `max_batch` images (a request with more runs
alone). Requests are grouped by the number of patches the graph keeps for their
drop ratio, so every request gets exactly the logits its own drop gives; each caller gets its own
rows back. Inference runs in one worker thread: ONNX Runtime already spreads a call over the
cores, and while it runs, the next batch gathers.

Work nobody is waiting for is skipped: a request whose caller gave up (its client went away) or
whose deadline passed never reaches the model. A failure fails only the requests of its call;
after `max_failures` failed calls in a row (the model cannot carry on), or if the loop itself
dies, `on_fatal` is called once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from lotus.drop import num_keep
from serve.errors import InputError, ServiceError

log = logging.getLogger("uvicorn.error")

RunFn = Callable[[np.ndarray, float], np.ndarray]  # (B, 3, H, W), drop -> (B, classes)


def _shutting_down() -> InputError:
    return InputError("the server is shutting down: retry on another replica", 503)


class DeadlinePassed(Exception):
    """A request's deadline passed before the model reached it."""


@dataclass
class _Pending:
    pixel_values: np.ndarray  # (b, 3, H, W)
    drop: float
    future: asyncio.Future
    deadline: float = float("inf")  # time.perf_counter() after which the answer is not wanted
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers `submit` calls into batched `run` calls (or runs each alone when `enabled` is False).

    Args:
        run: the blocking model call, run in the worker thread.
        num_patches: the model's patch count (requests keeping as many patches batch together).
        on_batch: called with (images, drop, seconds) after every model call (metrics).
        on_fatal: called once, with the reason, when the batcher cannot carry on.
        max_failures: failed model calls in a row after which it cannot.
    """

    def __init__(
        self,
        run: RunFn,
        num_patches: int,
        *,
        max_batch: int = 32,
        max_delay_ms: float = 2.0,
        enabled: bool = True,
        on_batch: Callable[[int, float, float], None] = lambda images, drop, seconds: None,
        on_fatal: Callable[[str], None] = lambda reason: None,
        max_failures: int = 5,
    ):
        self.run = run
        self.num_patches = num_patches
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000
        self.enabled = enabled
        self.on_batch = on_batch
        self.on_fatal = on_fatal
        self.max_failures = max_failures
        self.failures = 0  # failed model calls in a row
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lotus-infer")
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.overlapping = False  # the last call gathered several requests: wait for company

    async def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name="lotus-batcher")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.on_fatal(f"the batching loop ended: {type(task.exception()).__name__}: {task.exception()}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(_shutting_down())
        self.executor.shutdown(wait=True)

    async def submit(self, pixel_values: np.ndarray, drop: float, deadline: float = float("inf")) -> np.ndarray:
        """(b, 3, H, W) float32 at `drop` -> (b, classes) logits, batched with concurrent requests.

        Raises DeadlinePassed when `deadline` (a time.perf_counter() value) comes before the
        model reaches the request. Cancelling the caller withdraws the request.
        """
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(pixel_values, drop, future, deadline))
        return await future

    def _timed_run(self, pixel_values: np.ndarray, drop: float) -> np.ndarray:
        start = time.perf_counter()
        logits = self.run(pixel_values, drop)
        self.on_batch(len(pixel_values), drop, time.perf_counter() - start)
        return logits

    async def _gather(self) -> list[_Pending]:
        """Wait for a request and take every one queued behind it; under load, also wait for more
        until max_batch images or the oldest one's deadline."""
        first = await self.queue.get()
        if not self.enabled:
            return [first]
        gathered, images = [first], len(first.pixel_values)
        deadline = first.enqueued + self.max_delay if self.overlapping else 0.0
        while True:
            if not self.queue.empty():  # already waiting: always taken (split into calls below)
                pending = self.queue.get_nowait()
            elif images >= self.max_batch or (remaining := deadline - time.perf_counter()) <= 0:
                break
            else:
                try:
                    pending = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            gathered.append(pending)
            images += len(pending.pixel_values)
        self.overlapping = len(gathered) > 1
        return gathered

    def _batches(self, gathered: list[_Pending]) -> list[list[_Pending]]:
        """Split by patches kept, then into calls of at most max_batch images, in arrival order
        (of each call's oldest request)."""
        groups: dict[int, list[_Pending]] = defaultdict(list)
        for pending in gathered:
            groups[num_keep(self.num_patches, pending.drop)].append(pending)
        batches = []
        for group in groups.values():
            batch, images = [], 0
            for pending in group:
                if batch and images + len(pending.pixel_values) > self.max_batch:
                    batches.append(batch)
                    batch, images = [], 0
                batch.append(pending)
                images += len(pending.pixel_values)
            batches.append(batch)
        return sorted(batches, key=lambda batch: batch[0].enqueued)

    async def _loop(self) -> None:
        while True:
            gathered = await self._gather()
            try:
                for batch in self._batches(gathered):
                    await self._run(batch)
            except Exception as e:  # a bug outside the model call: fail this round, keep serving
                self._failed(gathered, e)
            finally:  # cancelled mid-way (shutdown): no caller is left waiting forever
                for pending in gathered:
                    if not pending.future.done():
                        pending.future.set_exception(_shutting_down())

    async def _run(self, batch: list[_Pending]) -> None:
        now = time.perf_counter()
        for p in batch:
            if not p.future.done() and p.deadline <= now:
                p.future.set_exception(DeadlinePassed())
        batch = [p for p in batch if not p.future.done()]  # callers that gave up, deadlines passed
        if not batch:
            return
        try:
            pixel_values = batch[0].pixel_values if len(batch) == 1 else np.concatenate([p.pixel_values for p in batch])
            # Any member's drop keeps the same patches as the others'.
            logits = await asyncio.get_running_loop().run_in_executor(self.executor, self._timed_run, pixel_values, batch[0].drop)
        except Exception as e:  # the callers answer for it; the loop goes on
            self._failed(batch, e)
            return
        self.failures = 0
        start = 0
        for p in batch:
            stop = start + len(p.pixel_values)
            if not p.future.done():
                p.future.set_result(logits[start:stop])
            start = stop

    def _failed(self, batch: list[_Pending], error: Exception) -> None:
        """Fail the batch's requests with a 500 that says what happened; after max_failures in a
        row, the model cannot carry on."""
        log.error("inference failed for a batch of %d request(s): %s: %s", len(batch), type(error).__name__, error)
        failure = ServiceError(
            f"inference failed for this request's batch ({type(error).__name__}: {error}); the server carries on: retry", 500
        )
        for p in batch:
            if not p.future.done():
                p.future.set_exception(failure)
        self.failures += 1
        if self.failures == self.max_failures:
            self.on_fatal(f"{self.failures} inference calls in a row failed, the last with {type(error).__name__}: {error}")
