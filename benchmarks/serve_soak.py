"""`lotus serve` soaked in mixed load for --minutes: valid traffic with a share of hostile requests.

One `lotus serve` subprocess on loopback (with an API key, and short header and body timeouts so a
slow client holds a load client for seconds, not half a minute). Clients on keep-alive
connections send back to back; how many are active cycles through --concurrency (1, 8, 32), a
--phase-s each. A valid request is, with equal odds, an OIP infer with binary tensors (1 or 8
images) or JSON (1 image) at drop 0, 0.25 or 0.5, or a /v1/classify of a JPEG or a PNG. With
probability --hostile (0.1) a client instead sends one hostile request, drawn from: malformed
JSON, a wrong shape, NaN, an oversize body (Content-Length and chunked), a wrong API key, image
bombs (PNG and JPEG headers claiming 30000x30000), a 16-bit RGBA PNG just under --max-pixels, a
truncated JPEG, a huge header, a slow header, a slow body, a disconnect mid-body and one while
queued. Every --report-s it prints the server's RSS, the answers by status and the health-check
latency (/v2/health/live polled every 50 ms from a thread of its own). At the end:

- RSS slope after the warm-up (MB/min, least squares over 1 s samples; target about 0),
- answers by status, valid and hostile, and those no request of its kind should get,
- 5xx other than 503 and 504, seen by the clients and counted by the server (target 0),
- health-check p50 / p99 / max (target p99 < 50 ms).

    python benchmarks/serve_soak.py [MODEL.onnx] [--minutes 10] [--concurrency 1,8,32]

The load generator is one asyncio process with every body encoded beforehand, but it shares the
machine's cores with the server: on a small machine its figures include the generator's share.
Writes benchmarks/results/serve_soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from common import write_result
from serve_hostile import (
    MB,
    Answer,
    Connection,
    HealthPoller,
    RssSampler,
    Server,
    chunks,
    classify_request,
    cpu_seconds,
    dropped,
    exchange,
    half_sent,
    huge_header,
    infer_request,
    jpeg_bomb,
    latency_stats,
    log,
    metric,
    photo,
    png,
    random_images,
    request,
    scrape,
    served_model,
    show,
    sixteen_bit_pngs,
)

DROPS = (0.0, 0.25, 0.5)
SHED = {"503", "504"}  # the server refusing work it cannot do in time: allowed for any request
# What each hostile request may be answered (besides SHED); anything else is counted as unexpected.
# "closed": the server hung up without an answer; "left": the client hung up, as it meant to.
EXPECTED = {
    "malformed_json": {"400"},
    "wrong_shape": {"400"},
    "nan": {"400"},
    "oversize_body": {"413"},
    "oversize_chunked": {"413"},
    "bad_api_key": {"401"},
    "image_bomb_png": {"413"},
    "image_bomb_jpeg": {"413", "400"},
    "png16": {"200"},
    "truncated_jpeg": {"400"},
    "huge_header": {"431"},
    "slow_header": {"408", "closed"},
    "slow_body": {"408"},
    "mid_body_disconnect": {"left"},
    "queued_disconnect": {"left"},
}


@dataclass
class Kit:
    """Every request body, encoded once before the load starts."""

    port: int
    auth: dict[str, str]  # the Authorization header (empty without a key)
    valid: dict[str, list[bytes]]  # kind -> its variants (drop ratios, batch sizes)
    hostile: dict[str, bytes]  # the hostile kinds' raw requests
    wait_s: float  # longest a slow hostile request waits for the server
    huge_header_bytes: int


def valid_requests(auth: dict[str, str]) -> dict[str, list[bytes]]:
    """The valid kinds: infer (binary, 1 or 8 images; JSON, 1 image) and classify (JPEG, PNG), at each drop."""
    jpeg, png_ = photo(640, 480, "JPEG", seed=1), photo(256, 256, "PNG", seed=2)

    def classify(image: bytes, name: str, kind: str, drop: float) -> bytes:
        raw = classify_request(image, name, kind, auth)
        return raw.replace(b"/v1/classify", f"/v1/classify?drop={drop}".encode(), 1)

    return {
        "infer_binary": [infer_request(random_images(b, seed=b), d, True, auth) for d in DROPS for b in (1, 8)],
        "infer_json": [infer_request(random_images(1), d, False, auth) for d in DROPS],
        "classify_jpeg": [classify(jpeg, "photo.jpg", "image/jpeg", d) for d in DROPS],
        "classify_png": [classify(png_, "photo.png", "image/png", d) for d in DROPS],
    }


def hostile_requests(max_pixels: int, auth: dict[str, str]) -> dict[str, bytes]:
    """The raw requests (head and body) the hostile kinds send."""
    nan = random_images(1)
    nan[0, 0, 0, 0] = np.nan
    json_path = "/v2/models/lotus/infer"
    return {
        "malformed_json": request("POST", json_path, b'{"inputs": [{"name": "pixel_values", "shape": [1, 3', auth),
        "wrong_shape": infer_request(random_images(1, size=16), 0.0, False, auth),
        "nan": infer_request(nan, 0.0, True, auth),
        "oversize_body": request("POST", json_path, bytes(9_000_000), {**auth, "Content-Type": "application/json"}),
        "bad_api_key": infer_request(random_images(1), 0.0, True, {"Authorization": "Bearer wrong-key"}),
        "image_bomb_png": classify_request(png(30000, 30000, 1, depth=1), "bomb.png", "image/png", auth),
        "image_bomb_jpeg": classify_request(jpeg_bomb(30000), "bomb.jpg", "image/jpeg", auth),
        "png16": classify_request(sixteen_bit_pngs(max_pixels, ["rgba16"])["rgba16"], "deep.png", "image/png", auth),
        "truncated_jpeg": classify_request(photo(640, 480, "JPEG")[:20000], "cut.jpg", "image/jpeg", auth),
        "big_infer": infer_request(random_images(64), 0.0, True, auth),
    }


def chunked_oversize(auth: dict[str, str], size: int = 9 * MB) -> list[bytes | memoryview]:
    """A chunked infer upload of `size` bytes (over the 8 MB default): caught on the bytes received."""
    head = request("POST", "/v2/models/lotus/infer", b"", {**auth, "Transfer-Encoding": "chunked"})
    block = b"%x\r\n" % MB + bytes(MB) + b"\r\n"
    return [head, *([block] * (size // MB)), b"0\r\n\r\n"]


def hostile_kinds(kit: Kit) -> dict[str, Callable[[], Awaitable[Answer]]]:
    """Each hostile kind as a coroutine factory, on a connection of its own."""
    port, raws, wait = kit.port, kit.hostile, kit.wait_s
    slow_header = b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    kinds = {
        name: (lambda raw=raws[name]: exchange(port, chunks(raw), timeout=30))
        for name in ("malformed_json", "wrong_shape", "nan", "oversize_body", "image_bomb_png", "image_bomb_jpeg", "png16")
    }
    kinds |= {
        "truncated_jpeg": lambda: exchange(port, [raws["truncated_jpeg"]], timeout=30),
        "oversize_chunked": lambda: exchange(port, chunked_oversize(kit.auth), timeout=30),
        "huge_header": lambda: exchange(port, huge_header(kit.huge_header_bytes), timeout=30),
        "slow_header": lambda: exchange(port, [slow_header], timeout=wait),
        "slow_body": lambda: exchange(port, [half_sent(raws["big_infer"])], timeout=wait),
        "mid_body_disconnect": lambda: exchange(port, [half_sent(raws["big_infer"])], leave=0.1),
        "queued_disconnect": lambda: exchange(port, chunks(raws["big_infer"]), leave=0.02),
    }
    if kit.auth:
        kinds["bad_api_key"] = lambda: exchange(port, [raws["bad_api_key"]], timeout=30)
    return kinds


@dataclass
class Tally:
    """Every answer, by group (valid or hostile), kind and label (status or how it ended)."""

    counts: dict[tuple[str, str], Counter] = field(default_factory=lambda: defaultdict(Counter))
    interval: Counter = field(default_factory=Counter)  # (group, label) since the last report
    valid_seconds: list[float] = field(default_factory=list)  # valid requests answered 200
    unexpected: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # kind -> labels
    examples: dict[str, str] = field(default_factory=dict)  # "kind label" -> the first body seen
    bad_error_bodies: Counter = field(default_factory=Counter)  # error answers not JSON {"error": one line}
    # answers read after the server reset the upload: clients that stop at the reset (curl, aiohttp) lose them
    cut_uploads: Counter = field(default_factory=Counter)  # "kind label"
    hostile_spans: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, kind) of each one

    def add(self, group: str, kind: str, answer: Answer) -> None:
        label = answer.label
        self.counts[(group, kind)][label] += 1
        self.interval[(group, label)] += 1
        if group == "valid" and label == "200":
            self.valid_seconds.append(answer.seconds)
        allowed = {"200"} if group == "valid" else EXPECTED[kind]
        if label not in allowed | SHED:
            self.unexpected[kind][label] += 1
            self.examples.setdefault(f"{kind} {label}", answer.body[:300].decode(errors="replace"))
        if answer.send_failed:
            self.cut_uploads[f"{kind} {label}"] += 1
        if not answer.error_shape_ok():
            self.bad_error_bodies[label] += 1
            self.examples.setdefault(f"{kind} {label} body", answer.body[:300].decode(errors="replace"))

    def five_hundreds(self) -> int:
        """Answers 5xx other than 503 and 504, over every kind."""
        return sum(n for c in self.counts.values() for label, n in c.items() if label.startswith("5") and label not in SHED)

    def take_interval(self) -> str:
        """The answers since the last call, as 'valid 200 x N ...; hostile ...'."""
        parts = []
        for group in ("valid", "hostile"):
            labels = sorted((label, n) for (g, label), n in self.interval.items() if g == group)
            parts.append(f"{group} " + " ".join(f"{label}x{n}" for label, n in labels))
        self.interval.clear()
        return "; ".join(parts)


@dataclass
class Load:
    """The shared state of the clients: which are active, when to stop, what they saw."""

    levels: tuple[int, ...]
    phase_s: float
    hostile_share: float
    start: float = field(default_factory=time.perf_counter)
    done: bool = False
    tally: Tally = field(default_factory=Tally)

    def level(self, at: float | None = None) -> int:
        """Clients active now (or at time.perf_counter() `at`): the concurrency levels in turn, a phase each."""
        elapsed = (time.perf_counter() if at is None else at) - self.start
        return self.levels[int(elapsed // self.phase_s) % len(self.levels)]


async def client(index: int, load: Load, kit: Kit, hostile: dict[str, Callable[[], Awaitable[Answer]]], seed: int) -> None:
    """Back-to-back requests while this client is among the active ones; a share of them hostile."""
    rng = random.Random(seed * 1000 + index)
    connection = Connection(kit.port)
    valid_kinds, hostile_kinds_ = sorted(kit.valid), sorted(hostile)
    while not load.done:
        if index >= load.level():
            connection.close()
            await asyncio.sleep(0.1)
            continue
        if rng.random() < load.hostile_share:
            kind, start = rng.choice(hostile_kinds_), time.perf_counter()
            load.tally.add("hostile", kind, await hostile[kind]())
            load.tally.hostile_spans.append((start, time.perf_counter(), kind))
        else:
            kind = rng.choice(valid_kinds)
            load.tally.add("valid", kind, await connection.exchange([rng.choice(kit.valid[kind])], timeout=60))
    connection.close()


def health_stalls(load: Load, samples: list[tuple[float, float]], over_s: float = 0.05) -> dict:
    """Health checks slower than `over_s` (or failed): how many at each number of active clients,
    and for each hostile kind the share of them it was in flight during, beside its share of all
    health checks (what the slow ones had in common)."""
    spans = load.tally.hostile_spans
    times = np.array([t for t, _ in samples])
    ends = times + np.array([min(s, 60.0) for _, s in samples])
    slow = np.array([s > over_s for _, s in samples])
    by_kind = {}
    for kind in sorted({k for _, _, k in spans}):
        mine = np.array([(a, b) for a, b, k in spans if k == kind])  # (n, 2): start, end
        in_flight = ((mine[None, :, 0] <= ends[:, None]) & (mine[None, :, 1] >= times[:, None])).any(axis=1)
        if slow.any() and in_flight[slow].any():
            by_kind[kind] = {"slow_checks": float(in_flight[slow].mean()), "all_checks": float(in_flight.mean())}
    by_clients = Counter(load.level(t) for (t, _), is_slow in zip(samples, slow) if is_slow)
    return {"over_ms": over_s * 1000, "count": int(slow.sum()), "by_clients": dict(by_clients), "hostile_in_flight": by_kind}


def rss_slope(samples: list[tuple[float, float]], start: float, warmup_s: float) -> float | None:
    """MB per minute, least squares over the samples after the warm-up (None with fewer than 10)."""
    later = [(t - start, mb) for t, mb in samples if t - start >= warmup_s]
    if len(later) < 10:
        return None
    minutes = np.array([t for t, _ in later]) / 60
    return float(np.polyfit(minutes, np.array([mb for _, mb in later]), 1)[0])


async def report(load: Load, server: Server, rss: RssSampler, health: HealthPoller, every: float, api_key: str | None) -> None:
    """A line every `every` seconds: time, active clients, RSS, queue, answers since the last, health."""
    since = time.perf_counter()
    while not load.done:
        await asyncio.sleep(every)
        metrics = await scrape(server.port, api_key)
        now = time.perf_counter()
        rss_now = rss.values(now - 2.0)[-1:] or [float("nan")]
        log(
            f"{now - load.start:6.0f} s  clients {load.level():>2}  RSS {rss_now[0]:.0f} MB  "
            f"queue {metric(metrics, 'lotus_queue_images'):.0f}  {load.tally.take_interval()}  "
            f"5xx other {load.tally.five_hundreds()}  health {show(latency_stats(health.values(since, now)))}"
        )
        since = now


def server_five_hundreds(metrics: dict) -> dict[str, float]:
    """lotus_requests_total with a 5xx status other than 503 and 504, by status."""
    found: Counter = Counter()
    for (name, labels), value in metrics.items():
        status = dict(labels).get("status", "")
        if name == "lotus_requests_total" and status.startswith("5") and status not in SHED:
            found[status] += value
    return dict(found)


async def soak(args: argparse.Namespace, server: Server, kit: Kit) -> dict:
    """Run the load for --minutes and sum it up."""
    load = Load(tuple(args.concurrency), args.phase_s, args.hostile)
    hostile = hostile_kinds(kit)
    rss, health = RssSampler(server.pid, 1.0), HealthPoller(server.port, 0.05)
    rss.start()
    health.start()
    before = await scrape(server.port, args.api_key or None)
    cpu_before = cpu_seconds(server.pid), time.process_time()
    load.start = time.perf_counter()
    clients = [asyncio.create_task(client(i, load, kit, hostile, args.seed)) for i in range(max(args.concurrency))]
    reporter = asyncio.create_task(report(load, server, rss, health, args.report_s, args.api_key or None))
    await asyncio.sleep(args.minutes * 60)
    load.done = True
    duration = time.perf_counter() - load.start
    cpu = {"server_s": cpu_seconds(server.pid) - cpu_before[0], "load_generator_s": time.process_time() - cpu_before[1]}
    await asyncio.wait(clients, timeout=kit.wait_s + 5)
    for task in [*clients, reporter]:
        task.cancel()
    await asyncio.gather(*clients, reporter, return_exceptions=True)
    rss.stop()
    health.stop()
    after = await scrape(server.port, args.api_key or None)
    result = summary(args, load, duration, rss, health, before, after, server)
    log(
        f"CPU over {duration:.0f} s on {os.cpu_count()} cores: server {cpu['server_s']:.0f} s, "
        f"load generator {cpu['load_generator_s']:.0f} s"
    )
    return result | {"cpu": cpu}


def summary(
    args: argparse.Namespace,
    load: Load,
    duration: float,
    rss: RssSampler,
    health: HealthPoller,
    before: dict,
    after: dict,
    server: Server,
) -> dict:
    """The end figures, printed and returned for the JSON."""
    tally = load.tally
    warmup = min(args.warmup_s, duration / 3)
    result = {
        "duration_s": duration,
        "warmup_s": warmup,
        "rss_slope_mb_per_min": rss_slope(rss.samples, load.start, warmup),
        "rss_mb": {"first": rss.samples[0][1], "last": rss.samples[-1][1], "max": max(v for _, v in rss.samples)},
        "rss_trace_mb": [[round(t - load.start, 1), round(mb, 1)] for t, mb in rss.samples[::5]],
        "answers": {f"{group} {kind}": dict(c) for (group, kind), c in sorted(tally.counts.items())},
        "valid_200_per_s": len(tally.valid_seconds) / duration,
        "valid_latency": latency_stats(tally.valid_seconds),
        "unexpected": {kind: dict(c) for kind, c in tally.unexpected.items()},
        "error_bodies_not_json": dict(tally.bad_error_bodies),
        "answered_after_upload_reset": dict(tally.cut_uploads),
        "examples": tally.examples,
        "client_5xx_other": tally.five_hundreds(),
        "server_5xx_other": server_five_hundreds(after),
        "server_statuses": server_statuses(before, after),
        "dropped_metric": dropped(before, after),
        "health": latency_stats(health.values(load.start)),
        "health_stalls": health_stalls(load, [x for x in health.samples if x[0] >= load.start]),
        "server_log": server.log_problems(),
        "targets": {"rss_slope_mb_per_min": 1, "5xx_other": 0, "health_p99_ms": 50},
    }
    slope = result["rss_slope_mb_per_min"]
    log(f"RSS slope after {warmup:.0f} s: {'-' if slope is None else f'{slope:+.2f}'} MB/min; RSS {result['rss_mb']}")
    log(f"valid: {result['valid_200_per_s']:.1f} answered/s, {show(result['valid_latency'])}")
    log(f"server statuses (health checks and /metrics left out): {result['server_statuses']}")
    log(
        f"5xx other than 503/504: {result['client_5xx_other']} seen by clients, {result['server_5xx_other']} counted by the server"
    )
    log(
        f"unexpected answers: {result['unexpected'] or 'none'}; error bodies not JSON: {result['error_bodies_not_json'] or 'none'}"
    )
    log(f"answers read only after the server reset the upload: {result['answered_after_upload_reset'] or 'none'}")
    log(f"health: {show(result['health'])}; server log: {result['server_log']}")
    stalls = result["health_stalls"]
    common = sorted(stalls["hostile_in_flight"].items(), key=lambda kv: kv[1]["all_checks"] - kv[1]["slow_checks"])[:4]
    shares = ", ".join(f"{k} {v['slow_checks']:.0%} (of all checks {v['all_checks']:.0%})" for k, v in common)
    log(
        f"health checks over {stalls['over_ms']:g} ms: {stalls['count']} (by active clients {stalls['by_clients']}); "
        f"hostile requests in flight during them: {shares or '-'}"
    )
    return result


def server_statuses(before: dict, after: dict) -> dict[str, float]:
    """lotus_requests_total by status over the run, the health checks and /metrics left out."""
    counts: Counter = Counter()
    for key, value in after.items():
        name, labels = key
        labels = dict(labels)
        if name == "lotus_requests_total" and labels.get("route") not in ("/v2/health/live", "/metrics"):
            counts[labels["status"]] += value - before.get(key, 0.0)
    return dict(sorted(counts.items()))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, help="Exported model.onnx (default: the synthetic ViT-Tiny, exported once).")
    p.add_argument("--minutes", type=float, default=10, help="How long the load runs.")
    p.add_argument("--concurrency", default="1,8,32", help="Active clients, in turn, a phase each.")
    p.add_argument("--phase-s", type=float, default=20, help="Seconds at each concurrency before the next.")
    p.add_argument("--hostile", type=float, default=0.1, help="Share of the requests that are hostile.")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=120,
        help="Seconds left out of the RSS slope (at most a third of the run): the allocator's one-time climb to its"
        " working size came between 60 and 150 s in the runs so far.",
    )
    p.add_argument("--report-s", type=float, default=30, help="Seconds between progress lines.")
    p.add_argument("--api-key", default="soak-key", help="The server's LOTUS_API_KEY ('' for none).")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="The server's --max-pixels; the 16-bit PNG sits under it.")
    p.add_argument("--header-timeout-s", type=float, default=2, help="The server's --header-timeout-s.")
    p.add_argument("--body-timeout-s", type=float, default=2, help="The server's --body-timeout-s.")
    p.add_argument("--huge-header-mb", type=float, default=1, help="Size of the huge hostile header, in MiB.")
    p.add_argument("--threads", type=int, default=None, help="The server's ONNX Runtime threads (default: its choice).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the clients' choices.")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main() -> None:
    args = parse_args()
    model = served_model(args.model)
    logs = Path(tempfile.mkdtemp(prefix="lotus-soak-"))
    flags = {
        "--max-pixels": args.max_pixels,
        "--header-timeout-s": args.header_timeout_s,
        "--body-timeout-s": args.body_timeout_s,
        **({"--threads": args.threads} if args.threads else {}),
    }
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server = Server(model, flags, logs, env={"LOTUS_API_KEY": args.api_key})
    log(
        f"model {model}; {os.cpu_count()} cores shared by the server and this load generator; "
        f"{args.minutes:g} min at {args.concurrency} clients, {args.hostile:.0%} hostile; server log {server.log_path}"
    )
    try:
        kit = Kit(
            server.port,
            auth,
            valid_requests(auth),
            hostile_requests(args.max_pixels, auth),
            max(args.header_timeout_s, args.body_timeout_s) + 10,
            int(args.huge_header_mb * MB),
        )
        result = asyncio.run(soak(args, server, kit))
    finally:
        server.stop()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}
    write_result("serve_soak", {"model": str(model), "config": config, "server_flags": flags, **result})


if __name__ == "__main__":
    main()
