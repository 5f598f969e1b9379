"""Dynamic batching on its own (no HTTP, a recording fake model): who shares a call, who waits."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from lotus.drop import num_keep
from serve.batching import Batcher, DeadlinePassed
from serve.errors import InputError, ServiceError

PATCHES = 16


class FakeModel:
    """Logits = per-image mean + num_keep, so a wrong row or a wrong drop shows; records calls."""

    def __init__(self, seconds: float = 0.0):
        self.calls: list[tuple[int, float]] = []
        self.seconds = seconds
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, pixel_values: np.ndarray, drop: float) -> np.ndarray:
        self.gate.wait(5)
        time.sleep(self.seconds)
        self.calls.append((len(pixel_values), drop))
        value = pixel_values.reshape(len(pixel_values), -1).mean(1, keepdims=True) + num_keep(PATCHES, drop)
        return np.repeat(value, 2, axis=1)


def expected(x: np.ndarray, drop: float) -> np.ndarray:
    return np.repeat(x.reshape(len(x), -1).mean(1, keepdims=True) + num_keep(PATCHES, drop), 2, axis=1)


def images(batch: int, value: float) -> np.ndarray:
    return np.full((batch, 3, 2, 2), value, dtype=np.float32)


def run(coroutine):
    return asyncio.run(coroutine)


def test_num_keep_is_the_graphs_rounding():
    assert [num_keep(16, d) for d in (0.0, 0.1, 0.12, 0.5, 0.95)] == [16, 14, 14, 8, 1]
    assert num_keep(16, 0.03125) == 16  # 0.5 patch rounds half to even, as ONNX Round does
    # the graph's tensor form keeps the same count at every ratio a request may ask for
    drops = [i / 1000 for i in range(951)]
    assert [int(num_keep(196, torch.tensor(d))) for d in drops] == [num_keep(196, d) for d in drops]


def test_requests_queued_together_share_calls_by_patches_kept_and_get_their_own_rows():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, PATCHES, max_batch=8, max_delay_ms=0)
        await batcher.start()
        cases = [
            (images(1 + i % 3, float(i)), drop) for i, drop in enumerate([0.0, 0.1, 0.12, 0.5, 0.0, 0.1, 0.5, 0.0, 0.12, 0.5])
        ]
        tasks = [asyncio.create_task(batcher.submit(x, drop)) for x, drop in cases]
        results = await asyncio.gather(*tasks)
        await batcher.stop()
        return cases, results

    cases, results = run(main())
    for (x, drop), logits in zip(cases, results):
        np.testing.assert_array_equal(logits, expected(x, drop))
    # All ten were queued when the model came free: one call per patches-kept group (0.1 and
    # 0.12 both keep 14 patches), the 11 images keeping 14 split to stay within max_batch 8.
    assert [(size, num_keep(PATCHES, drop)) for size, drop in model.calls] == [(5, 16), (8, 14), (3, 8), (3, 14)]


def test_a_request_larger_than_max_batch_runs_alone():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, PATCHES, max_batch=4, max_delay_ms=0)
        await batcher.start()
        logits = await batcher.submit(images(6, 1.0), 0.3)
        await batcher.stop()
        return logits

    assert run(main()).shape == (6, 2) and model.calls == [(6, 0.3)]


def test_a_lone_client_is_not_delayed():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, PATCHES, max_batch=32, max_delay_ms=500)
        await batcher.start()
        start = time.perf_counter()
        for _ in range(3):
            await batcher.submit(images(1, 0.0), 0.0)
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed

    assert run(main()) < 0.4  # three sequential requests, none waited 500 ms for company


def test_batching_off_runs_each_request_alone():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, PATCHES, enabled=False)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(images(2, float(i)), 0.5) for i in range(4)))
        await batcher.stop()
        return results

    results = run(main())
    assert model.calls == [(2, 0.5)] * 4
    for i, logits in enumerate(results):
        np.testing.assert_array_equal(logits, expected(images(2, float(i)), 0.5))


def test_a_failing_call_fails_its_callers_and_the_next_call_works():
    calls = []

    def flaky(pixel_values, drop):
        calls.append(drop)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros((len(pixel_values), 2), dtype=np.float32)

    async def main():
        batcher = Batcher(flaky, PATCHES, max_delay_ms=0)
        await batcher.start()
        with pytest.raises(ServiceError, match=r"inference failed .*RuntimeError: boom.*carries on") as failed:
            await batcher.submit(images(1, 0.0), 0.0)
        ok = await batcher.submit(images(1, 0.0), 0.0)
        await batcher.stop()
        return failed.value.status, ok

    status, ok = run(main())
    assert status == 500 and ok.shape == (1, 2)


def test_a_batch_that_cannot_be_assembled_fails_alone_and_the_loop_goes_on():
    model = FakeModel()
    model.gate.clear()  # hold the first call, so the next two requests queue together

    async def main():
        batcher = Batcher(model, PATCHES, max_batch=8, max_delay_ms=0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(images(1, 0.0), 0.0))
        await asyncio.sleep(0.05)
        # images of two sizes in one call cannot be stacked: that call fails, not the loop
        odd = [asyncio.create_task(batcher.submit(np.zeros((1, 3, s, s), np.float32), 0.0)) for s in (2, 3)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await first
        results = await asyncio.gather(*odd, return_exceptions=True)
        after = await batcher.submit(images(2, 1.0), 0.0)
        await batcher.stop()
        return results, after

    results, after = run(main())
    assert all(isinstance(r, ServiceError) and r.status == 500 for r in results)
    np.testing.assert_allclose(after, expected(images(2, 1.0), 0.0))


def test_a_model_that_keeps_failing_is_reported_once():
    fatal = []

    def broken(pixel_values, drop):
        raise RuntimeError("session lost")

    async def main():
        batcher = Batcher(broken, PATCHES, max_delay_ms=0, max_failures=3, on_fatal=fatal.append)
        await batcher.start()
        for _ in range(5):
            with pytest.raises(ServiceError):
                await batcher.submit(images(1, 0.0), 0.0)
        await batcher.stop()

    run(main())
    assert len(fatal) == 1 and "3 inference calls in a row failed" in fatal[0] and "session lost" in fatal[0]


def test_work_past_its_deadline_or_withdrawn_never_reaches_the_model():
    model = FakeModel()
    model.gate.clear()

    async def main():
        batcher = Batcher(model, PATCHES, max_batch=8, max_delay_ms=0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(images(1, 0.0), 0.0))
        await asyncio.sleep(0.05)  # the model is busy with the first request
        late = asyncio.create_task(batcher.submit(images(2, 0.0), 0.0, deadline=time.perf_counter() + 0.01))
        withdrawn = asyncio.create_task(batcher.submit(images(3, 0.0), 0.0))
        kept = asyncio.create_task(batcher.submit(images(4, 0.0), 0.0))
        await asyncio.sleep(0.05)
        withdrawn.cancel()  # its client went away
        model.gate.set()
        await asyncio.gather(first, kept)
        with pytest.raises(DeadlinePassed):
            await late
        await batcher.stop()

    run(main())
    assert model.calls == [(1, 0.0), (4, 0.0)]


def test_shutdown_answers_every_waiting_caller():
    model = FakeModel()

    async def main():
        batcher = Batcher(model, PATCHES, max_batch=2, max_delay_ms=0)
        await batcher.start()
        model.gate.clear()
        tasks = [asyncio.create_task(batcher.submit(images(1, 0.0), 0.0)) for _ in range(5)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await batcher.stop()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = run(main())
    assert all(isinstance(o, np.ndarray) or (isinstance(o, InputError) and o.status == 503) for o in outcomes)
    assert any(isinstance(o, InputError) for o in outcomes)
