"""`lotus serve` under hostile load: worst-case images, a huge header, backpressure, slow clients.

Each section measures one acceptance figure against a `lotus serve` subprocess on loopback,
started with the flags the section needs (a and b share one):

a. memory: four 16-bit PNGs (greyscale, RGB, RGBA in turn) just under --max-pixels, POSTed to
   /v1/classify at once; the server's RSS (/proc, every 10 ms) before, at its peak and 5 s after
   (targets: peak - before <= 300 MB, after - before <= 50 MB);
b. header: one 128 MB header line on a raw socket; time until the server answers (431 expected,
   target <= 1 s) and /v2/health/live latency meanwhile from another connection (<= 50 ms);
c. backpressure: 200 concurrent requests of 64 images (binary tensor extension) against
   --max-queue-images (default: the server's own) and --timeout-ms: 200s, 503s (with
   Retry-After, target <= 50 ms), 504s, accepted latency against the deadline, 503 latency of
   requests sent one at a time into the full queue, and health latency meanwhile (p99 < 50 ms);
d. slow clients (--header-timeout-s 2, --body-timeout-s 2): half a header, a stalled body, a
   disconnect mid-body and one while queued behind other work (is its work skipped?); then
   whether the server still answers.

    python benchmarks/serve_hostile.py [MODEL.onnx] [--quick] [--sections abcd]

Without a model it serves serve_latency's --synthetic ViT-Tiny (CIFAR-10's shape), exported once
and kept in the temp folder. Flags this `lotus serve` lacks are left out and listed in the JSON.
Every error body is checked to be JSON {"error": "one line"}; the server logs are kept (the path is
printed) and their ERROR lines reported per section. --quick (about a minute once the model
exists): one PNG kind (RGBA) and 2 s after, a 16 MB header, 50 requests. Writes
benchmarks/results/serve_hostile.json (serve_hostile_quick.json with --quick, and the sections'
letters appended when not all four ran). The load generator shares the machine's cores with the
server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from common import ROOT, stop_server, wait_until_ready, write_result
from serve_latency import free_port, synthetic_model

from serve.bench import infer_body  # the bodies `lotus bench` sends (JSON or binary tensors)

HOST = "127.0.0.1"
MB = 1 << 20
# Linux's SO_TIMESTAMPNS (Python has no name for it): the kernel stamps every packet it receives,
# so an answer's arrival is known apart from when this client's busy event loop reads it
SO_TIMESTAMPNS = 35
SYNTHETIC = Path(tempfile.gettempdir()) / "lotus-serve-synthetic"  # the exported synthetic model, kept between runs


def log(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- the model and the server


def served_model(model: Path | None) -> Path:
    """`model`, or serve_latency's synthetic ViT-Tiny, exported once into the temp folder."""
    if model is not None:
        return model
    if not (SYNTHETIC / "model.onnx").is_file():
        log(f"exporting the synthetic ViT-Tiny into {SYNTHETIC} (once; about a minute)")
        building = Path(tempfile.mkdtemp(prefix="lotus-serve-synthetic-"))
        synthetic_model(building)
        with contextlib.suppress(OSError):  # another run finished first: keep its copy
            building.rename(SYNTHETIC)
        shutil.rmtree(building, ignore_errors=True)
    return SYNTHETIC / "model.onnx"


def serve_flags() -> set[str]:
    """The long options `lotus serve --help` lists."""
    lotus = Path(sys.executable).with_name("lotus")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    text = subprocess.run([str(lotus), "serve", "--help"], capture_output=True, text=True, env=env).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", text))


class Server:
    """`lotus serve MODEL FLAGS` in a subprocess, its log in a file, ready once /v2/health/ready says so.

    Flags this server does not know are left out (listed in `missing`), so the benchmark runs on an
    older server too. stderr goes to a file, not a pipe: a chatty server never blocks on its log.
    """

    known_flags: set[str] | None = None

    def __init__(self, model: Path, flags: dict[str, object], log_dir: Path, env: dict[str, str] | None = None):
        if Server.known_flags is None:
            Server.known_flags = serve_flags()
        self.flags = flags
        self.missing = [f for f in flags if f not in Server.known_flags]
        self.port = free_port()
        self.log_path = log_dir / f"serve-{self.port}.log"
        self.log_offset = 0
        args = [a for f, v in flags.items() if f not in self.missing for a in (f, str(v))]
        lotus = Path(sys.executable).with_name("lotus")
        command = [str(lotus), "serve", str(model), "--port", str(self.port), "--no-access-log", *args]
        with self.log_path.open("w") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        self.pid = self.process.pid
        wait_until_ready(self.process, f"http://{HOST}:{self.port}", self.log_path)
        if self.missing:
            log(f"  this lotus serve has no {', '.join(self.missing)}: left out")

    def queue_capacity(self) -> int | None:
        """The queue bound the server logged at startup (its own measurement when not set), if it did."""
        found = re.search(r"queue up to (\d+) images", self.log_path.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    def log_problems(self) -> dict:
        """ERROR lines and tracebacks the server logged since the last call: how many, and the first few."""
        text = self.log_path.read_text(errors="replace")
        new, self.log_offset = text[self.log_offset :], len(text)
        lines = [line for line in new.splitlines() if line.startswith("ERROR") or line.startswith("Traceback")]
        return {"error_lines": len(lines), "first": lines[:5]}

    def stop(self) -> None:
        stop_server(self.process)


# ---------------------------------------------------------------- samplers (threads, off the event loop)


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants, in MB (VmRSS from /proc)."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):  # a process that just ended
            rss = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{current}/status").read_text())
            total += int(rss.group(1)) / 1024 if rss else 0.0  # a zombie has no VmRSS
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` so far, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Calls `measure()` every `interval` seconds until stopped; keeps (time, value) pairs."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def measure(self) -> float:
        raise NotImplementedError

    def run(self) -> None:
        while not self.halt.is_set():
            start = time.perf_counter()
            value = self.measure()
            self.samples.append((start, value))
            self.halt.wait(max(0.0, self.interval - (time.perf_counter() - start)))

    def stop(self) -> None:
        self.halt.set()
        self.join()

    def values(self, since: float = 0.0, until: float = math.inf) -> list[float]:
        return [v for t, v in list(self.samples) if since <= t <= until]


class RssSampler(Sampler):
    """The server's RSS in MB."""

    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(interval)
        self.pid = pid

    def measure(self) -> float:
        return rss_mb(self.pid)


HEALTH_REQUEST = f"GET /v2/health/live HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


class HealthPoller(Sampler):
    """GET /v2/health/live on its own keep-alive connection (blocking socket, own thread); each
    sample is the seconds it took, a failure (timeout, reset, non-200) counting as +inf."""

    def __init__(self, port: int, interval: float = 0.01, timeout: float = 5.0):
        super().__init__(interval)
        self.port, self.timeout = port, timeout
        self.sock: socket.socket | None = None

    def measure(self) -> float:
        start = time.perf_counter()
        try:
            if self.sock is None:
                self.sock = socket.create_connection((HOST, self.port), timeout=self.timeout)
            self.sock.sendall(HEALTH_REQUEST)
            ok = self._read_answer()
        except OSError:
            ok = False
        if not ok and self.sock is not None:
            self.sock.close()
            self.sock = None
        return time.perf_counter() - start if ok else math.inf

    def _read_answer(self) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        if length is None:  # not an answer this poller can read: start over on a new connection
            return False
        while len(body) < int(length.group(1)):
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            body += chunk
        return head.startswith(b"HTTP/1.1 200")


def latency_stats(seconds: Iterable[float]) -> dict:
    """p50, p99 and max in ms of the finite values, and how many were failures (inf)."""
    values = list(seconds)
    ms = np.array([s for s in values if math.isfinite(s)]) * 1000
    stats: dict = {"count": len(values), "failures": len(values) - len(ms)}
    if len(ms):
        stats |= {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}
    return stats


def show(stats: dict) -> str:
    if not stats["count"]:
        return "no samples"
    if "p50_ms" not in stats:
        return f"no answers ({stats.get('failures', 0)} failures)"
    failures = f", {stats['failures']} failed" if stats.get("failures") else ""
    return f"p50 {stats['p50_ms']:.1f} / p99 {stats['p99_ms']:.1f} / max {stats['max_ms']:.1f} ms ({stats['count']}{failures})"


# ---------------------------------------------------------------- a raw HTTP/1.1 client


@dataclass
class Answer:
    status: int | None  # None: the connection ended without an answer
    seconds: float  # from the first byte sent to the last byte of the answer (or the connection's end)
    outcome: str = "answered"  # or "closed" (EOF), "reset", "timeout", "left" (the client hung up on purpose)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    sent: int = 0  # bytes written before the answer came (or the client left)
    send_failed: bool = False  # the server hung up while the request was still being sent
    # from the first byte sent to the answer's first bytes reaching this client's socket (the
    # kernel's receive time): what a client on a machine of its own would see; `seconds` also
    # holds the time this load generator's event loop, busy with every other client, took to read it
    arrived: float | None = None

    @property
    def label(self) -> str:
        """The status, or how the connection ended."""
        return str(self.status) if self.status is not None else self.outcome

    def error_shape_ok(self) -> bool:
        """An error answer's body is JSON {"error": "one line"} (True for 2xx and for no answer)."""
        if self.status is None or self.status < 400:
            return True
        try:
            error = json.loads(self.body).get("error")
        except (ValueError, AttributeError):
            return False
        return isinstance(error, str) and "\n" not in error


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """The bytes of an HTTP/1.1 request with a Content-Length (for POST)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if method == "POST" and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunks(data: bytes | memoryview, size: int = 256 * 1024) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + size] for i in range(0, len(view), size)]


def parse_answer(buffer: bytes | bytearray, ended: bool) -> tuple[int, dict[str, str], bytes, int] | None:
    """The first response in `buffer`: status, headers, body and the bytes it took; None while
    incomplete. A body with neither Content-Length nor chunking ends with the connection."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    status_line, *lines = bytes(buffer[:head_end]).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    start = head_end + 4
    if "content-length" in headers:
        end = start + int(headers["content-length"])
        body = bytes(buffer[start:end]) if len(buffer) >= end else None
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body, end = dechunk(buffer, start)
    else:
        body, end = (bytes(buffer[start:]), len(buffer)) if ended else (None, 0)
    return None if body is None else (int(status_line.split()[1]), headers, body, end)


def dechunk(buffer: bytes | bytearray, start: int) -> tuple[bytes | None, int]:
    """A chunked body from `start`, and where it ends; (None, 0) while incomplete."""
    body, at = b"", start
    while (line_end := buffer.find(b"\r\n", at)) >= 0:
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        if size == 0:
            return (body, line_end + 4) if len(buffer) >= line_end + 4 else (None, 0)
        if len(buffer) < line_end + 2 + size + 2:
            return None, 0
        body += bytes(buffer[line_end + 2 : line_end + 2 + size])
        at = line_end + 2 + size + 2
    return None, 0


class Connection:
    """One keep-alive connection to the server, on a raw non-blocking socket; reopened when the
    server closed it or it idled.

    Sending and reading run side by side, so an answer the server gives before the body is in is
    read. When the server hangs up while the body is still going out, sending stops and whatever
    it answered is still read (as urllib3 does; curl and asyncio's transports give up on the
    reset instead); such answers are marked `send_failed`."""

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.sent = 0
        self.send_failed = False
        self.last_used = 0.0
        self.first_arrival: float | None = None  # wall-clock time the current answer's first bytes arrived

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.buffer.clear()

    async def _open(self) -> None:
        if self.sock is None or time.perf_counter() - self.last_used > 2.0:
            self.close()  # the server may close an idle keep-alive connection: do not race it
            sock = socket.socket()
            if sys.platform == "linux":
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (HOST, self.port))
            self.sock = sock

    async def _send(self, parts: Iterable[bytes | memoryview], pause: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            for part in parts:
                await loop.sock_sendall(self.sock, part)
                self.sent += len(part)
        except OSError:  # the server hung up mid-body: its answer may still be there to read
            self.send_failed = True
            return
        if pause:  # hold the connection open, silent
            await asyncio.sleep(pause)

    async def _answer(self) -> tuple[int, dict[str, str], bytes] | str:
        """The next response (taken off the buffer), or how the connection ended without one."""
        ended = None
        while True:
            parsed = parse_answer(self.buffer, ended is not None)
            if parsed is not None:
                status, headers, body, used = parsed
                del self.buffer[:used]
                return status, headers, body
            if ended:
                return ended
            try:
                data = await self._recv()
            except OSError:
                ended = "reset"
                continue
            if not data:
                ended = "closed"
            self.buffer += data

    async def _recv(self) -> bytes:
        """What the socket holds (up to 64 KiB), once it holds something; the first bytes'
        arrival time, as the kernel stamped it, goes to `first_arrival`."""
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16))
            except BlockingIOError:
                await self._readable()
                continue
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and self.first_arrival is None:
                    seconds, nanoseconds = struct.unpack("qq", value[:16])
                    self.first_arrival = seconds + nanoseconds / 1e9
            return data

    async def _readable(self) -> None:
        loop, fd = asyncio.get_running_loop(), self.sock.fileno()
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(fd)

    def _arrived(self, wall_start: float) -> float | None:
        return None if self.first_arrival is None else self.first_arrival - wall_start

    async def exchange(self, parts: Iterable[bytes | memoryview], timeout: float = 60.0, leave: float | None = None) -> Answer:
        """Send `parts` (reading the answer meanwhile) and return the answer; with `leave`, hang up
        `leave` seconds after the last part instead of waiting for one."""
        await self._open()
        self.sent, self.send_failed, start, wall_start = 0, False, time.perf_counter(), time.time()
        self.first_arrival = None
        sending = asyncio.create_task(self._send(parts, leave or 0.0))
        try:
            if leave is not None:
                await asyncio.wait_for(sending, timeout)
                self.close()
                return Answer(None, time.perf_counter() - start, "left", sent=self.sent)
            got = await asyncio.wait_for(self._answer(), timeout)
        except asyncio.TimeoutError:
            got = "timeout"
        finally:
            if not sending.done():
                sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        self.last_used = time.perf_counter()
        arrived = self._arrived(wall_start)
        if isinstance(got, str):
            self.close()
            return Answer(None, self.last_used - start, got, sent=self.sent, send_failed=self.send_failed)
        status, headers, body = got
        if headers.get("connection", "").lower() == "close" or self.send_failed:
            self.close()
        return Answer(
            status,
            self.last_used - start,
            headers=headers,
            body=body,
            sent=self.sent,
            send_failed=self.send_failed,
            arrived=arrived,
        )

    async def exchange_continue(self, raw: bytes, timeout: float = 60.0) -> Answer:
        """Send `raw`'s head (it says Expect: 100-continue) and its body only once the server
        answers 100 Continue, as curl does for large bodies; a final answer instead ends it."""
        await self._open()
        self.sent, self.send_failed, start, wall_start = 0, False, time.perf_counter(), time.time()
        self.first_arrival = None
        head_end = raw.index(b"\r\n\r\n") + 4
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.sock, raw[:head_end])
            while b"\r\n\r\n" not in self.buffer:
                data = await asyncio.wait_for(self._recv(), timeout)
                if not data:
                    break
                self.buffer += data
            if self.buffer.startswith(b"HTTP/1.1 100"):
                del self.buffer[: self.buffer.index(b"\r\n\r\n") + 4]
                self.last_used = time.perf_counter()  # the same connection carries the body
                answer = await self.exchange(chunks(raw[head_end:]), timeout)
                answer.seconds = time.perf_counter() - start
                answer.arrived = self._arrived(wall_start)
                return answer
            got = await asyncio.wait_for(self._answer(), timeout)
        except (asyncio.TimeoutError, OSError):
            got = "timeout"
        self.last_used = time.perf_counter()
        arrived = self._arrived(wall_start)
        self.close()
        if isinstance(got, str):
            return Answer(None, self.last_used - start, got, sent=self.sent)
        status, headers, body = got
        return Answer(status, self.last_used - start, headers=headers, body=body, sent=self.sent, arrived=arrived)


async def exchange(port: int, parts: Iterable[bytes | memoryview], timeout: float = 60.0, leave: float | None = None) -> Answer:
    """`Connection.exchange` on a connection of its own, closed afterwards."""
    connection = Connection(port)
    try:
        return await connection.exchange(parts, timeout, leave)
    finally:
        connection.close()


async def get(port: int, path: str, headers: dict[str, str] | None = None) -> Answer:
    return await exchange(port, [request("GET", path, headers=headers)], timeout=30)


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(name, frozenset of (label, value)): value}."""
    found = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        found[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return found


def metric(metrics: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in metrics.items() if n == name and wanted <= series)


async def scrape(port: int, api_key: str | None = None) -> dict[tuple[str, frozenset], float]:
    answer = await get(port, "/metrics", {"Authorization": f"Bearer {api_key}"} if api_key else None)
    return parse_metrics(answer.body.decode()) if answer.status == 200 else {}


def dropped(before: dict, after: dict) -> dict[str, float]:
    """lotus_dropped_requests_total by reason, between two scrapes."""
    reasons = ("queue_full", "deadline", "client_gone")
    name = "lotus_dropped_requests_total"
    return {r: metric(after, name, reason=r) - metric(before, name, reason=r) for r in reasons}


# ---------------------------------------------------------------- request bodies


def png(width: int, height: int, channels: int, depth: int = 16) -> bytes:
    """A PNG of `channels` (1 grey, 3 RGB, 4 RGBA) at `depth` bits, a horizontal ramp on every row.

    Written chunk by chunk (Pillow cannot write 16-bit RGB or RGBA): every row after the first is
    filtered 'Up', so all zeros, and the file stays small however many pixels it has.
    """
    color = {1: 0, 3: 2, 4: 6}[channels]
    samples = width * channels
    ramp = np.arange(samples, dtype=np.uint64) * ((1 << depth) - 1) // max(1, samples - 1)
    if depth == 16:
        row = ramp.astype(">u2").tobytes()
    elif depth == 8:
        row = ramp.astype(np.uint8).tobytes()
    else:  # 1 bit
        row = np.packbits(ramp.astype(np.uint8)).tobytes()
    compress = zlib.compressobj(6)
    up = b"\x02" + bytes(len(row))
    data = compress.compress(b"\x00" + row) + b"".join(compress.compress(up) for _ in range(height - 1)) + compress.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def photo(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """A photo-like RGB image (smooth colours plus noise) as JPEG or PNG bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def jpeg_bomb(side: int = 30000) -> bytes:
    """A small JPEG whose frame header claims `side` x `side` pixels."""
    data = bytearray(photo(64, 64, "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def classify_body(image: bytes, filename: str, content_type: str) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with `image` as the field `file`, and its headers."""
    boundary = "lotus-hostile-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    return head.encode() + image + f"\r\n--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"
    }


def classify_request(image: bytes, filename: str, content_type: str, headers: dict[str, str] | None = None) -> bytes:
    body, body_headers = classify_body(image, filename, content_type)
    return request("POST", "/v1/classify", body, {**body_headers, **(headers or {})})


def infer_request(images: np.ndarray, drop: float = 0.0, binary: bool = True, headers: dict[str, str] | None = None) -> bytes:
    """A /v2/models/lotus/infer request for (B, 3, H, W) `images`, as `lotus bench` sends it."""
    body, body_headers = infer_body(images, drop, binary)
    return request("POST", "/v2/models/lotus/infer", body, {**body_headers, **(headers or {})})


def random_images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size), dtype=np.float32)


def half_sent(raw: bytes) -> bytes:
    """The request's head and half its body."""
    head_end = raw.index(b"\r\n\r\n") + 4
    return raw[: head_end + (len(raw) - head_end) // 2]


def huge_header(size: int, path: str = "/v2/health/live") -> list[bytes | memoryview]:
    """A GET whose one header line holds `size` bytes, as 1 MB parts."""
    block = b"a" * MB
    parts: list[bytes | memoryview] = [f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nX-Huge: ".encode()]
    parts += [block] * (size // MB) + [block[: size % MB]]
    return [*parts, b"\r\n\r\n"]


# ---------------------------------------------------------------- a. memory


def under_limit(max_pixels: int) -> tuple[int, int]:
    """The largest width x height with width = isqrt(max_pixels) strictly under `max_pixels` pixels."""
    width = math.isqrt(max_pixels)
    return width, (max_pixels - 1) // width


def sixteen_bit_pngs(max_pixels: int, kinds: Iterable[str]) -> dict[str, bytes]:
    """16-bit PNGs just under the pixel limit, checked to open in Pillow at the size meant."""
    from PIL import Image

    width, height = under_limit(max_pixels)
    images = {}
    for kind in kinds:
        data = png(width, height, {"grey16": 1, "rgb16": 3, "rgba16": 4}[kind])
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (width, height):
                raise SystemExit(f"the {kind} PNG opens as {image.size}, not {width}x{height}")
        images[kind] = data
    return images


async def memory_section(server: Server, max_pixels: int, kinds: list[str], after_s: float) -> dict:
    """Four concurrent 16-bit PNGs per kind; RSS before, at the peak and `after_s` later."""
    images = await asyncio.to_thread(sixteen_bit_pngs, max_pixels, kinds)
    small = classify_request(png(64, 64, 4), "small.png", "image/png")
    for _ in range(3):  # warm: Pillow's PNG plugin, the route, the batcher
        await exchange(server.port, [small])
    sampler, health = RssSampler(server.pid, 0.01), HealthPoller(server.port, 0.01)
    sampler.start()
    health.start()
    await asyncio.sleep(1.0)
    first_before = rss_mb(server.pid)
    rows = {kind: await four_at_once(server, sampler, health, kind, data, after_s) for kind, data in images.items()}
    sampler.stop()
    health.stop()
    last = rss_mb(server.pid)
    trace = sampler.samples[::10]  # every 0.1 s
    worst = max(r["peak_minus_before_mb"] for r in rows.values())
    log(f"  worst peak - before: {worst:.0f} MB (target <= 300); after all - before all: {last - first_before:.0f} MB (<= 50)")
    return {
        "image": "{}x{}".format(*under_limit(max_pixels)),
        "kinds": rows,
        "worst_peak_minus_before_mb": worst,
        "rss_first_before_mb": first_before,
        "rss_last_after_mb": last,
        "after_minus_before_mb": last - first_before,
        "rss_trace_mb": [[round(t - trace[0][0], 2), round(mb, 1)] for t, mb in trace],
        "targets": {"peak_minus_before_mb": 300, "after_minus_before_mb": 50},
    }


async def four_at_once(server: Server, sampler: RssSampler, health: HealthPoller, kind: str, data: bytes, after_s: float) -> dict:
    """One PNG POSTed four times at once to /v1/classify: the answers, the RSS around them and the
    health check's latency while they are decoded."""
    before, start = rss_mb(server.pid), time.perf_counter()
    raw = classify_request(data, f"{kind}.png", "image/png")
    answers = await asyncio.gather(*(exchange(server.port, [raw], timeout=120) for _ in range(4)))
    health_during = latency_stats(health.values(start, time.perf_counter()))
    await asyncio.sleep(after_s)
    after, peak = rss_mb(server.pid), max(sampler.values(start))
    log(
        f"  {kind}: {[a.label for a in answers]} in {max(a.seconds for a in answers):.2f} s; RSS before {before:.0f} MB, "
        f"peak +{peak - before:.0f} MB, {after_s:g} s after +{after - before:.0f} MB; health meanwhile {show(health_during)}"
    )
    return {
        "file_bytes": len(data),
        "statuses": [a.label for a in answers],
        "seconds": [round(a.seconds, 3) for a in answers],
        "rss_before_mb": before,
        "rss_peak_mb": peak,
        "rss_after_mb": after,
        "peak_minus_before_mb": peak - before,
        "after_minus_before_mb": after - before,
        "health_during": health_during,
    }


# ---------------------------------------------------------------- b. a huge header


async def header_section(server: Server, size: int) -> dict:
    """A `size`-byte header line: time to the server's answer, and health latency meanwhile."""
    poller = HealthPoller(server.port, 0.005)
    poller.start()
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    answer = await exchange(server.port, huge_header(size), timeout=120)
    end = time.perf_counter()
    await asyncio.sleep(0.3)
    poller.stop()
    during = latency_stats(poller.values(start, end + 0.3))  # the 0.3 s after too: a stalled loop shows late
    after = await get(server.port, "/v2/health/live")
    log(
        f"  {size / MB:g} MB header: {answer.label} after {answer.seconds:.3f} s ({answer.sent / MB:.1f} MB sent; "
        f"target <= 1 s, 431); health meanwhile and 0.3 s after {show(during)}; then {after.label}"
    )
    return {
        "header_bytes": size,
        "answer": answer.label,
        "seconds": answer.seconds,
        "bytes_sent_before_answer": answer.sent,
        "upload_cut_by_server": answer.send_failed,
        "error_body_ok": answer.error_shape_ok(),
        "body": answer.body[:200].decode(errors="replace"),
        "health_during": during,
        "health_before": latency_stats(poller.values(0, start)),
        "health_after": after.label,
        "targets": {"seconds": 1.0, "status": 431, "health_max_ms": 50},
    }


# ---------------------------------------------------------------- c. backpressure


def shapes_ok(answers: Iterable[Answer]) -> dict[str, int]:
    """Error answers whose body is not JSON {"error": "one line"}, by status."""
    return dict(Counter(a.label for a in answers if not a.error_shape_ok()))


async def backpressure_section(server: Server, requests: int, images: int, timeout_ms: float, probes: int) -> dict:
    """`requests` concurrent requests of `images` images each: what is admitted, shed and dropped.
    Once the crowd has filled the queue, `probes` more requests one at a time time the 503 alone."""
    raw = infer_request(random_images(images))
    await exchange(server.port, [infer_request(random_images(1))])  # warm
    before = await scrape(server.port)
    poller = HealthPoller(server.port, 0.01)
    poller.start()
    start = time.perf_counter()
    crowd = asyncio.gather(*(exchange(server.port, chunks(raw), timeout=120) for _ in range(requests)))
    await asyncio.sleep(0.3)
    probed = [await exchange(server.port, chunks(raw), timeout=120) for _ in range(probes)]
    answers = await crowd
    wall = time.perf_counter() - start
    poller.stop()
    after = await scrape(server.port)
    result = {
        "requests": requests,
        "images_per_request": images,
        "queue_capacity_images": server.queue_capacity(),
        "timeout_ms": timeout_ms,
        "body_bytes": len(raw),
        "wall_s": wall,
        **crowd_figures(answers, timeout_ms),
        "probes": {
            "statuses": dict(Counter(a.label for a in probed)),
            "upload_cut_by_server": sum(a.send_failed for a in probed),
            "latency_503": latency_stats(a.seconds for a in probed if a.status == 503),
            "arrival_503": latency_stats(a.arrived for a in probed if a.status == 503 and a.arrived is not None),
        },
        "health": latency_stats(poller.values(start)),
        "dropped_metric": dropped(before, after),
        "targets": {"shed_p99_ms": 50, "health_p99_ms": 50},
    }
    show_crowd(result)
    result["expect_continue"] = await continue_crowd(server, requests, images, timeout_ms)
    return result


async def continue_crowd(server: Server, requests: int, images: int, timeout_ms: float) -> dict:
    """The same crowd from clients that send Expect: 100-continue (curl's default for large
    bodies): a refused request's body is never sent, so the 503's latency is the server's own."""
    raw = infer_request(random_images(images), headers={"Expect": "100-continue"})
    await asyncio.sleep(3)  # the first crowd's accepted work drains
    poller = HealthPoller(server.port, 0.01)
    poller.start()
    start = time.perf_counter()
    answers = await asyncio.gather(*(Connection(server.port).exchange_continue(raw, timeout=120) for _ in range(requests)))
    wall = time.perf_counter() - start
    poller.stop()
    result = {
        "requests": requests,
        "wall_s": wall,
        **crowd_figures(answers, timeout_ms),
        "health": latency_stats(poller.values(start)),
    }
    log(f"  the same crowd with Expect: 100-continue, in {wall:.1f} s: {result['statuses']}")
    show_latencies(result)
    log(f"  health meanwhile: {show(result['health'])}")
    return result


def crowd_figures(answers: list[Answer], timeout_ms: float) -> dict:
    """Statuses, latency by status, accepted latency against the deadline, Retry-After on 503s."""
    by_status: dict[str, list[Answer]] = {}
    for a in answers:
        by_status.setdefault(a.label, []).append(a)
    accepted, shed = by_status.get("200", []), by_status.get("503", [])
    return {
        "statuses": {k: len(v) for k, v in sorted(by_status.items())},
        "latency": {k: latency_stats(a.seconds for a in v) for k, v in sorted(by_status.items())},
        # the same, to the answer's arrival at this client's socket (see Answer.arrived)
        "arrival": {
            k: latency_stats(a.arrived for a in v if a.arrived is not None)
            for k, v in sorted(by_status.items())
            if any(a.arrived is not None for a in v)
        },
        "accepted_within_deadline": sum(a.seconds * 1000 <= timeout_ms for a in accepted),
        "accepted_over_deadline_max_ms": max([a.seconds * 1000 - timeout_ms for a in accepted] + [0.0]),
        "shed_with_retry_after": sum("retry-after" in a.headers for a in shed),
        "retry_after_values": sorted({a.headers.get("retry-after", "-") for a in shed}),
        "error_bodies_not_json": shapes_ok(answers),
        "upload_cut_by_server": sum(a.send_failed for a in answers),
    }


def show_latencies(result: dict) -> None:
    """Latency by status: read by this load generator, and arrived at its sockets."""
    for status, stats in result["latency"].items():
        arrival = result["arrival"].get(status)
        log(f"    {status}: {show(stats)}" + (f"; arrived at the socket: {show(arrival)}" if arrival else ""))


def show_crowd(result: dict) -> None:
    accepted, shed = result["statuses"].get("200", 0), result["statuses"].get("503", 0)
    log(
        f"  {result['requests']} x {result['images_per_request']} images (queue {result['queue_capacity_images']} images, "
        f"deadline {result['timeout_ms']:g} ms) in {result['wall_s']:.1f} s: {result['statuses']}"
    )
    show_latencies(result)
    log(
        f"  accepted within the deadline: {result['accepted_within_deadline']} of {accepted}; "
        f"503s with Retry-After: {result['shed_with_retry_after']} of {shed} {result['retry_after_values']}; "
        f"dropped (metrics) {result['dropped_metric']}; read only after the server reset the upload: "
        f"{result['upload_cut_by_server']}"
    )
    probes = result["probes"]
    log(
        f"  one at a time into the full queue: {probes['statuses']} ({probes['upload_cut_by_server']} read after a reset); "
        f"503 latency {show(probes['latency_503'])}"
    )
    log(f"  health meanwhile: {show(result['health'])}")


# ---------------------------------------------------------------- d. slow clients


async def slow_section(server: Server, header_timeout: float, body_timeout: float, burst: int) -> dict:
    """Half a header, a stalled body, a disconnect mid-body and one while queued; then a check."""
    wait = max(header_timeout, body_timeout) + 10  # the server's own timeouts when it lacks the flags
    half_header = f"GET /v2/health/live HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()
    raw = infer_request(random_images(64))
    result = {
        "half_header": await exchange(server.port, [half_header], timeout=wait),
        "stalled_body": await exchange(server.port, [half_sent(raw)], timeout=wait),
    }
    for name in result:
        log(f"  {name}: {result[name].label} after {result[name].seconds:.2f} s")
    result = {name: answer_summary(a) for name, a in result.items()}
    result["mid_body_disconnect"] = await mid_body_disconnect(server, raw)
    result["queued_disconnect"] = await queued_disconnect(server, raw, burst)
    checks = [
        await get(server.port, "/v2/health/live"),
        await exchange(server.port, [infer_request(random_images(1))]),
        await exchange(server.port, [classify_request(photo(64, 64, "PNG"), "x.png", "image/png")]),
    ]
    result["still_answers"] = {"health": checks[0].label, "infer": checks[1].label, "classify": checks[2].label}
    log(f"  afterwards: {result['still_answers']}")
    result["targets"] = {
        "half_header": f"408 or closed after {header_timeout:g} s",
        "stalled_body": f"408 after {body_timeout:g} s",
    }
    return result


def answer_summary(answer: Answer) -> dict:
    return {
        "answer": answer.label,
        "seconds": answer.seconds,
        "error_body_ok": answer.error_shape_ok(),
        "body": answer.body[:200].decode(errors="replace"),
    }


def status_count(metrics: dict, status: str) -> float:
    return metric(metrics, "lotus_requests_total", status=status)


async def mid_body_disconnect(server: Server, raw: bytes) -> dict:
    """Half the body, then the client hangs up: the server should log and count it (499), not fail."""
    await asyncio.sleep(1.0)  # the earlier clients' disconnects are counted first
    before = await scrape(server.port)
    await exchange(server.port, [half_sent(raw)], leave=0.2)
    await asyncio.sleep(0.5)
    after = await scrape(server.port)
    result = {
        "status_499": status_count(after, "499") - status_count(before, "499"),
        "status_5xx": sum(status_count(after, s) - status_count(before, s) for s in ("500", "502")),
        "dropped_metric": dropped(before, after),
        "server_log": server.log_problems(),
    }
    log(f"  mid_body_disconnect: counted 499 x{result['status_499']:g}, 5xx x{result['status_5xx']:g}; {result['server_log']}")
    return result


async def queued_disconnect(server: Server, raw: bytes, burst: int) -> dict:
    """A burst of 64-image requests, then one more whose client hangs up while it waits in the queue:
    its images should not be inferred."""
    before = await scrape(server.port)
    load = [asyncio.create_task(exchange(server.port, chunks(raw), timeout=120)) for _ in range(burst)]
    await asyncio.sleep(0.05)
    gone = await exchange(server.port, chunks(raw), leave=0.05)
    answers = await asyncio.gather(*load)
    await asyncio.sleep(0.5)
    after = await scrape(server.port)
    answered_images = 64 * sum(a.status == 200 for a in answers)
    inferred = metric(after, "lotus_batch_size_images_sum") - metric(before, "lotus_batch_size_images_sum")
    result = {
        "burst_statuses": dict(Counter(a.label for a in answers)),
        "victim": gone.label,
        "images_inferred": inferred,
        "images_answered": answered_images,
        "victim_inferred": inferred > answered_images,
        "status_499": status_count(after, "499") - status_count(before, "499"),
        "dropped_metric": dropped(before, after),
        "server_log": server.log_problems(),
    }
    log(
        f"  queued_disconnect: burst {result['burst_statuses']}; inferred {inferred:g} images for {answered_images} answered "
        f"(the gone client's work {'done' if result['victim_inferred'] else 'skipped'}); dropped {result['dropped_metric']}"
    )
    return result


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, help="Exported model.onnx (default: the synthetic ViT-Tiny, exported once).")
    p.add_argument("--quick", action="store_true", help="A smoke run under a minute: smaller figures, same sections.")
    p.add_argument("--sections", default="abcd", help="Which sections to run (a memory, b header, c backpressure, d slow).")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="The server's --max-pixels; the PNGs sit just under it.")
    p.add_argument("--header-mb", type=float, default=128, help="Size of the huge header line, in MiB.")
    p.add_argument("--requests", type=int, default=200, help="Concurrent requests in the backpressure section.")
    p.add_argument("--images", type=int, default=64, help="Images per backpressure request.")
    p.add_argument(
        "--queue-images",
        type=int,
        default=None,
        help="The backpressure server's --max-queue-images (default: its own, 2 s of work and at most half the deadline's).",
    )
    p.add_argument("--timeout-ms", type=float, default=2000, help="The backpressure server's --timeout-ms.")
    p.add_argument(
        "--slow-timeout-s", type=float, default=2, help="The slow-client server's --header-timeout-s and --body-timeout-s."
    )
    p.add_argument("--probes", type=int, default=10, help="Requests sent one at a time into the full queue.")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of every server (default: its choice).")
    args = p.parse_args()
    if not args.sections or not set(args.sections) <= set("abcd"):
        p.error(f"--sections takes letters of abcd, not {args.sections!r}")
    if args.quick:
        args.header_mb, args.requests = min(args.header_mb, 16), min(args.requests, 50)
    return args


async def run_sections(args: argparse.Namespace, model: Path, log_dir: Path) -> dict:
    """Each chosen section against a server started with its flags (shared by consecutive sections
    with the same flags); returns their results and each server's flags."""
    base = {"--threads": args.threads} if args.threads else {}
    slow = {"--header-timeout-s": args.slow_timeout_s, "--body-timeout-s": args.slow_timeout_s}
    queue = {"--max-queue-images": args.queue_images} if args.queue_images else {}
    plans = {
        "a": ("memory", {"--max-pixels": args.max_pixels}),
        "b": ("header", {"--max-pixels": args.max_pixels}),
        "c": ("backpressure", {"--timeout-ms": args.timeout_ms, **queue}),
        "d": ("slow_clients", {**slow, "--max-queue-images": 64 * (burst(args) + 2)}),
    }
    results, servers, server, start = {}, {}, None, time.perf_counter()
    try:
        for key in args.sections:
            name, flags = plans[key]
            log(f"{key}. {name} ({time.perf_counter() - start:.0f} s in)")
            if server is None or server.flags != {**base, **flags}:
                if server is not None:
                    server.stop()
                server = Server(model, {**base, **flags}, log_dir)
            results[name] = await run_section(key, server, args)
            results[name]["server_log"] = server.log_problems()
            servers[name] = {"flags": server.flags, "flags_missing": server.missing, "log": str(server.log_path)}
    finally:
        if server is not None:
            server.stop()
    log(f"done in {time.perf_counter() - start:.0f} s")
    return {"sections": results, "servers": servers}


async def run_section(key: str, server: Server, args: argparse.Namespace) -> dict:
    if key == "a":
        kinds = ["rgba16"] if args.quick else ["grey16", "rgb16", "rgba16"]
        return await memory_section(server, args.max_pixels, kinds, 2.0 if args.quick else 5.0)
    if key == "b":
        return await header_section(server, int(args.header_mb * MB))
    if key == "c":
        return await backpressure_section(server, args.requests, args.images, args.timeout_ms, args.probes)
    header_timeout = 10.0 if "--header-timeout-s" in server.missing else args.slow_timeout_s  # else the server's defaults
    body_timeout = 30.0 if "--body-timeout-s" in server.missing else args.slow_timeout_s
    return await slow_section(server, header_timeout, body_timeout, burst(args))


def burst(args: argparse.Namespace) -> int:
    """64-image requests queued ahead of the client that leaves while queued."""
    return 2 if args.quick else 4


def main() -> None:
    args = parse_args()
    model = served_model(args.model)
    logs = Path(tempfile.mkdtemp(prefix="lotus-hostile-"))
    log(f"model {model}; {os.cpu_count()} cores (shared by the server and this load generator); server logs in {logs}")
    result = asyncio.run(run_sections(args, model, logs))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    name = "serve_hostile" + ("_quick" if args.quick else "") + (f"_{args.sections}" if args.sections != "abcd" else "")
    write_result(name, {"model": str(model), "config": config, "server_logs": str(logs), **result})


if __name__ == "__main__":
    main()
