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
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from lotus.drop import num_keep
from serve.model import InputError

RunFn = Callable[[np.ndarray, float], np.ndarray]  # (B, 3, H, W), drop -> (B, classes)


def _shutting_down() -> InputError:
    return InputError("the server is shutting down: retry on another replica", 503)


@dataclass
class _Pending:
    pixel_values: np.ndarray  # (b, 3, H, W)
    drop: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers `submit` calls into batched `run` calls (or runs each alone when `enabled` is False).

    Args:
        run: the blocking model call, run in the worker thread.
        num_patches: the model's patch count (requests keeping as many patches batch together).
        on_batch: called with (images, drop, seconds) after every model call (metrics).
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
    ):
        self.run = run
        self.num_patches = num_patches
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000
        self.enabled = enabled
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lotus-infer")
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.overlapping = False  # the last call gathered several requests: wait for company

    async def start(self) -> None:
        if self.enabled:
            self.task = asyncio.create_task(self._loop(), name="lotus-batcher")

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

    async def submit(self, pixel_values: np.ndarray, drop: float) -> np.ndarray:
        """(b, 3, H, W) float32 at `drop` -> (b, classes) logits, batched with concurrent requests."""
        if not self.enabled:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._timed_run, pixel_values, drop)
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(pixel_values, drop, future))
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
            finally:  # cancelled mid-way (shutdown): no caller is left waiting forever
                for pending in gathered:
                    if not pending.future.done():
                        pending.future.set_exception(_shutting_down())

    async def _run(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]  # callers that gave up
        if not batch:
            return
        pixel_values = batch[0].pixel_values if len(batch) == 1 else np.concatenate([p.pixel_values for p in batch])
        try:
            # Any member's drop keeps the same patches as the others'.
            logits = await asyncio.get_running_loop().run_in_executor(self.executor, self._timed_run, pixel_values, batch[0].drop)
        except Exception as e:  # the callers answer for it; the loop goes on
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        start = 0
        for p in batch:
            stop = start + len(p.pixel_values)
            if not p.future.done():
                p.future.set_result(logits[start:stop])
            start = stop
