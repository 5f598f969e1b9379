"""The service under hostile load, against a real uvicorn on loopback: oversized and slow
headers and bodies, a full queue, deadlines, clients that leave, a failing model. Every case
gets a one-line 4xx or 503/504 (never a 500 for the client's fault or overload) and the server
goes on serving. The figures (memory, latency under load) are measured by
benchmarks/serve_hostile.py and benchmarks/serve_soak.py."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import live_server
from PIL import Image

from serve.admission import UPLOAD_GRACE_S, queue_capacity
from serve.app import create_app
from serve.settings import Settings

SIZE = 16
INFER = "/v2/models/lotus/infer"


def settings(model, **overrides) -> Settings:
    base = dict(model=model, max_delay_ms=0, max_images=4, max_body_mb=0.2, api_key=None)
    return Settings(**{**base, **overrides})


def body(batch: int = 1) -> dict:
    data = np.zeros((batch, 3, SIZE, SIZE), np.float32).ravel().tolist()
    return {"inputs": [{"name": "pixel_values", "shape": [batch, 3, SIZE, SIZE], "datatype": "FP32", "data": data}]}


class Gate:
    """Wraps the model call: holds every call until opened, counts the images that reach it,
    and can raise instead."""

    def __init__(self, run, fail: int = 0):
        self.run, self.fail = run, fail
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.images: list[int] = []

    def __call__(self, pixel_values, drop):
        self.images.append(len(pixel_values))
        self.entered.set()
        self.opened.wait(10)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("injected failure")
        return self.run(pixel_values, drop)


def gated_server(tiny_onnx, gate_kwargs=None, on_fatal=None, **overrides):
    """A live server whose model calls pass through a Gate; yields (url, gate, app)."""
    import contextlib

    @contextlib.contextmanager
    def running():
        app = create_app(settings(tiny_onnx, **overrides), on_fatal=on_fatal or (lambda reason: None))
        with live_server(settings(tiny_onnx, **overrides), app) as url:
            batcher = app.state.service.batcher
            gate = Gate(batcher.run, **(gate_kwargs or {}))
            batcher.run = gate
            yield url, gate, app

    return running()


def raw(url: str, data: bytes, read: bool = True, wait: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; the answer (until the server closes), or b""."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload or b"{}")


@pytest.fixture
def server_log(caplog):
    """The server's log records during the test (the test server leaves logging to pytest)."""
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    return caplog


@pytest.fixture(scope="module")
def strict(tiny_onnx):
    """Short timeouts and a small head limit, so going over them is cheap."""
    with live_server(settings(tiny_onnx, max_header_kb=8, header_timeout_s=0.5, body_timeout_s=0.5)) as url:
        yield url


def test_an_oversized_header_is_refused_with_431_while_health_checks_answer(strict):
    huge = b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n"
    answer = []
    sender = threading.Thread(target=lambda: answer.append(raw(strict, huge)))
    sender.start()
    assert httpx.get(strict + "/v2/health/live").status_code == 200
    sender.join(10)
    status, error = status_and_json(answer[0])
    assert status == 431 and "over the limit of 8 KB (--max-header-kb)" in error["error"]
    assert httpx.post(strict + INFER, json=body()).status_code == 200
    assert 'lotus_requests_total{method="-",route="other",status="431"} 1.0' in httpx.get(strict + "/metrics").text


def test_slow_headers_and_bodies_get_408_and_idle_connections_are_closed(strict):
    start = time.perf_counter()
    status, error = status_and_json(raw(strict, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"))
    assert status == 408 and "headers did not arrive within 0.5 s" in error["error"]
    assert time.perf_counter() - start < 5
    assert raw(strict, b"") == b""  # connected, never sent a byte: closed without an answer
    stalled = (
        b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
    )
    status, error = status_and_json(raw(strict, stalled))
    assert status == 408 and "no data for 0.5 s (--body-timeout-s)" in error["error"]
    assert httpx.post(strict + INFER, json=body()).status_code == 200


def test_a_client_that_leaves_mid_body_is_logged_as_such_not_as_an_error(strict, server_log):
    records = server_log.records
    cut = b"POST " + INFER.encode() + b' HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{"inputs": ['
    raw(strict, cut, read=False)
    time.sleep(0.3)
    assert any("disconnected while sending its body" in r.getMessage() for r in records)
    assert not [r for r in records if r.levelno >= logging.ERROR]
    metrics = httpx.get(strict + "/metrics").text
    assert 'route="/v2/models/{name}/infer",status="499"' in metrics and 'status="500"' not in metrics


def test_a_full_queue_answers_503_with_retry_after_at_once(tiny_onnx):
    with gated_server(tiny_onnx, max_queue_images=4) as (url, gate, app):

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                first = asyncio.create_task(client.post(INFER, json=body(4)))
                await asyncio.to_thread(gate.entered.wait, 5)
                start = time.perf_counter()
                refused = await client.post(INFER, json=body(1))
                refused_after = time.perf_counter() - start
                gate.opened.set()
                return await first, refused, refused_after

        first, refused, refused_after = asyncio.run(main())
        assert first.status_code == 200
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "at capacity (4 images queued, limit 4: --max-queue-images)" in refused.json()["error"]
        assert refused_after < 2  # not queued behind the held call
        assert gate.images == [4]  # the refused request never reached the model
        assert httpx.post(url + INFER, json=body(1)).status_code == 200
        metrics = httpx.get(url + "/metrics").text
        assert 'lotus_dropped_requests_total{reason="queue_full"} 1.0' in metrics
        assert "lotus_queue_images 0.0" in metrics


def test_a_full_queue_refuses_from_the_headers_alone_but_a_stranger_still_gets_401(tiny_onnx):
    key = {"Authorization": "Bearer s3cret"}
    with gated_server(tiny_onnx, max_queue_images=4, api_key="s3cret") as (url, gate, app):

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=20, headers=key) as client:
                first = asyncio.create_task(client.post(INFER, json=body(4)))
                await asyncio.to_thread(gate.entered.wait, 5)
                # the head of a 1-image request, its body never sent
                head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n"
                refused = await asyncio.to_thread(raw, url, (head + "Authorization: Bearer s3cret\r\n\r\n").encode())
                stranger = await asyncio.to_thread(raw, url, (head + "\r\n").encode())
                gate.opened.set()
                return await first, refused, stranger

        first, refused, stranger = asyncio.run(main())
        assert first.status_code == 200
        status, error = status_and_json(refused)
        assert status == 503 and "at capacity" in error["error"]
        assert b"\r\nretry-after: " in refused.lower() and b"\r\nconnection: close\r\n" in refused.lower()
        status, error = status_and_json(stranger)
        assert status == 401 and error["error"].startswith("missing API key")  # not told the queue's state
        metrics = httpx.get(url + "/metrics", headers=key).text
        assert 'lotus_requests_total{method="POST",route="/v2/models/{name}/infer",status="503"} 1.0' in metrics
        assert 'lotus_dropped_requests_total{reason="queue_full"} 1.0' in metrics
        assert httpx.post(url + INFER, json=body(1), headers=key).status_code == 200


def test_the_default_queue_holds_two_seconds_of_work_and_at_most_half_the_deadline(tiny_onnx):
    def capacity(**overrides) -> int:
        return queue_capacity(settings(tiny_onnx, **overrides), seconds_per_image=0.010)

    assert capacity() == 200  # 2 s at 10 ms an image, under the default 30 s deadline
    assert capacity(timeout_ms=2000) == 100  # half of a 2 s deadline: admitted work finishes in time under load
    assert capacity(timeout_ms=50) == 4  # never less than one request's max_images
    assert capacity(timeout_ms=2000, max_queue_images=300) == 300  # given: as given


def test_a_slow_upload_gives_its_share_of_the_queue_back(tiny_onnx):
    with live_server(settings(tiny_onnx, max_queue_images=4)) as url:
        request = json.dumps(body(4)).encode()
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(request)}\r\n\r\n"
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(head.encode() + request[: len(request) // 2])  # then nothing, for now
            assert httpx.post(url + INFER, json=body(4)).status_code == 503  # the slow upload holds the queue...
            time.sleep(UPLOAD_GRACE_S + 0.3)
            assert httpx.post(url + INFER, json=body(4)).status_code == 200  # ...until it is late: then it is free
            slow.sendall(request[len(request) // 2 :])
            status, _ = status_and_json(slow.recv(65536))
        assert status == 200


def test_past_its_deadline_queued_work_is_dropped_with_504(tiny_onnx):
    with gated_server(tiny_onnx, timeout_ms=300, max_queue_images=16) as (url, gate, app):

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                running = asyncio.create_task(client.post(INFER, json=body(1)))
                await asyncio.to_thread(gate.entered.wait, 5)
                queued = await client.post(INFER, json=body(2))
                late = await running
                gate.opened.set()
                return late, queued

        late, queued = asyncio.run(main())
        for response in (late, queued):
            assert response.status_code == 504 and "deadline of 300 ms (--timeout-ms)" in response.json()["error"]
        time.sleep(0.2)
        assert gate.images == [1]  # the queued request was dropped before the model
        assert httpx.post(url + INFER, json=body(1)).status_code == 200


def test_work_of_a_client_that_left_never_reaches_the_model(tiny_onnx, server_log):
    with gated_server(tiny_onnx, max_queue_images=16) as (url, gate, app):

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                running = asyncio.create_task(client.post(INFER, json=body(1)))
                await asyncio.to_thread(gate.entered.wait, 5)
                with pytest.raises(httpx.ReadTimeout):  # gives up and closes its connection
                    await client.post(INFER, json=body(3), timeout=0.3)
                await asyncio.sleep(0.2)
                gate.opened.set()
                return await running

        assert asyncio.run(main()).status_code == 200
        time.sleep(0.2)
        assert gate.images == [1]
        assert any("disconnected before its answer was ready" in r.getMessage() for r in server_log.records)
        assert 'lotus_dropped_requests_total{reason="client_gone"} 1.0' in httpx.get(url + "/metrics").text


def test_an_injected_batch_failure_fails_only_that_batch(tiny_onnx):
    with gated_server(tiny_onnx, gate_kwargs={"fail": 1}) as (url, gate, app):
        gate.opened.set()
        failed = httpx.post(url + INFER, json=body(1))
        assert failed.status_code == 500
        assert "inference failed for this request's batch (RuntimeError: injected failure)" in failed.json()["error"]
        assert httpx.post(url + INFER, json=body(2)).status_code == 200
        assert httpx.get(url + "/v2/health/ready").status_code == 200


def test_a_model_that_cannot_carry_on_turns_readiness_false_and_stops(tiny_onnx):
    fatal = []
    with gated_server(tiny_onnx, gate_kwargs={"fail": 100}, on_fatal=fatal.append) as (url, gate, app):
        gate.opened.set()
        for _ in range(5):
            assert httpx.post(url + INFER, json=body(1)).status_code == 500
        ready = httpx.get(url + "/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert len(fatal) == 1 and "5 inference calls in a row failed" in fatal[0]
        assert httpx.post(url + INFER, json=body(1)).status_code == 503


def test_answers_before_the_body_is_read_close_the_connection_and_count_under_their_route(tiny_onnx):
    with live_server(settings(tiny_onnx, api_key="s3cret", max_body_mb=0.01)) as url:
        unauthorised = httpx.post(url + INFER, json=body(1))
        assert unauthorised.status_code == 401 and unauthorised.headers["connection"] == "close"
        assert "connection" not in httpx.get(url + "/v2").headers  # no body left unread: kept alive
        key = {"Authorization": "Bearer s3cret"}
        too_large = httpx.post(url + INFER, json=body(4), headers=key)
        assert too_large.status_code == 413 and too_large.headers["connection"] == "close"
        metrics = httpx.get(url + "/metrics", headers=key).text
        for status in ("401", "413"):
            assert f'lotus_requests_total{{method="POST",route="/v2/models/{{name}}/infer",status="{status}"}}' in metrics


def test_an_answer_given_before_the_body_is_read_reaches_a_client_still_sending(strict):
    # Over --max-body-mb by Content-Length: 413 at once, while the client goes on sending 30 MB,
    # more than the sockets' buffers hold. The server reads and drops the rest instead of
    # resetting the connection, so the client gets to read the answer.
    host, port = strict.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\n\r\n")
        chunk = b"0" * 1_000_000
        for _ in range(30):
            sock.sendall(chunk)
        answer = sock.recv(65536)
    status, error = status_and_json(answer)
    assert status == 413 and "over the limit of 0.2 MB" in error["error"]


def test_the_pixel_limit_counts_what_an_image_decodes_to(tiny_onnx):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8))
    with live_server(settings(tiny_onnx, max_pixels=100_000, max_body_mb=20)) as url:
        for fmt, status in (("JPEG", 200), ("PNG", 413)):  # a JPEG decodes at 1/8 scale here: 250x250
            data = io.BytesIO()
            photo.save(data, fmt)
            response = httpx.post(url + "/v1/classify", files={"file": ("photo", data.getvalue())}, timeout=30)
            assert response.status_code == status, response.text
        assert "2000x2000 = 4000000 pixels, over the limit of 100000 (--max-pixels)" in response.json()["error"]


BROKEN_SERVER = """
import sys
from serve.model import ServedModel
from serve.app import run_server
from serve.settings import Settings

working = ServedModel.run
def run(self, pixel_values, drop):  # the session breaks once serving: every call at drop > 0 fails
    if drop > 0:
        raise RuntimeError("session lost")
    return working(self, pixel_values, drop)
ServedModel.run = run
run_server(Settings(model=sys.argv[1], port=int(sys.argv[2]), max_delay_ms=0), log_level="warning", access_log=False)
"""


@pytest.mark.slow  # a Python process of its own: about 15 s
def test_lotus_serve_exits_with_status_1_when_the_model_cannot_carry_on(tiny_onnx):
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", BROKEN_SERVER, str(tiny_onnx), str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        failing = {**body(1), "parameters": {"drop": 0.5}}
        statuses = [httpx.post(url + INFER, json=failing, timeout=10).status_code for _ in range(5)]
        assert statuses == [500] * 5
        _, errors = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 1
    assert "the model could not carry on (5 inference calls in a row failed" in errors and "session lost" in errors
