"""`lotus bench URL`: an HTTP load generator in the style of Triton's perf_analyzer.

For each concurrency C and each drop ratio, C clients (asyncio tasks on keep-alive connections)
send back-to-back infer requests, each waiting for its answer before sending the next (closed
loop), until the cell's request count (or duration) is reached. Each cell starts with untimed
warm-up requests. With `rounds` R > 1 every cell is visited R times, round-robin, each visit a
1/R share of its requests: slow drifts of a shared machine then hit every cell alike, and each
p50 ratio to drop 0 is the median of the R ratios measured side by side.

The client is aiohttp: it costs the CPU it shares with the server about half of what httpx does
per request, so less of the client is counted as the server's overhead. Bodies are encoded once
per drop ratio before timing, so the client spends its time on HTTP, not on JSON. Latency is
measured by the client, from the first byte sent to the last byte read: what a caller sees. With
`local`, ONNX Runtime alone is timed on the same model and input with the server's session
settings, just before each concurrency-1 cell of every round, and the HTTP overhead is the median
over rounds of the difference of the two medians (everything a request costs beyond the model:
client, network stack, server), each difference measured side by side.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lotus.bench import percentiles, time_calls
from lotus.checkpoint import atomic_write_text
from lotus.errors import LotusError
from lotus.progress import Progress, report

if TYPE_CHECKING:
    from serve.model import ServedModel

PROGRESS_LABEL = "load cells"
Body = tuple[bytes, dict[str, str]]  # an encoded request body and its headers
Log = Callable[[str], None]


@dataclass(frozen=True)
class HttpBenchConfig:
    """What `lotus bench URL` loads: the (concurrency, drop) cells, and how each is sent and timed."""

    concurrency: tuple[int, ...] = (1, 4, 16)  # clients sending at once, one cell each
    drops: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)  # drop ratios, one cell each
    requests: int = 200  # timed requests per cell (ignored when duration is set)
    duration: float | None = None  # seconds per cell instead of a request count
    warmup: int = 20  # untimed requests before each cell
    batch: int = 1  # images per request
    model: str = "lotus"  # model name in the URL
    binary: bool = False  # send and receive tensors with the binary tensor extension instead of JSON
    api_key: str | None = None  # sent as 'Authorization: Bearer KEY'
    timeout: float = 60.0  # seconds before a request counts as an error
    seed: int = 0  # of the random input images (speed does not depend on them)
    rounds: int = 1  # visits of every cell, round-robin, each with a 1/rounds share of its requests


def infer_body(images: np.ndarray, drop: float, binary: bool) -> Body:
    """The infer request for `images` at `drop`: JSON, or with the tensor in binary after it (Triton's extension)."""
    tensor = {"name": "pixel_values", "shape": list(images.shape), "datatype": "FP32"}
    request: dict[str, Any] = {"inputs": [tensor], "parameters": {"drop": drop}}
    if not binary:
        tensor["data"] = images.ravel().tolist()
        return json.dumps(request).encode(), {"Content-Type": "application/json"}
    tensor["parameters"] = {"binary_data_size": images.nbytes}
    request["parameters"]["binary_data_output"] = True
    header = json.dumps(request).encode()
    return header + images.tobytes(), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


async def _model_input_size(client, cfg: HttpBenchConfig, url: str) -> int:
    import aiohttp

    try:
        async with client.get(f"/v2/models/{cfg.model}") as response:
            status, text = response.status, await response.text()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        raise LotusError(f"cannot reach {url} ({type(e).__name__}: {e}): is `lotus serve` running there?") from None
    if status == 401:
        raise LotusError(f"{url} wants an API key: pass --api-key or set LOTUS_API_KEY")
    if status != 200:
        raise LotusError(f"{url}/v2/models/{cfg.model} answered {status}: {text[:200]}")
    shape = json.loads(text)["inputs"][0]["shape"]
    return int(shape[-1])


async def _closed_loop(
    client, path: str, body: bytes, headers: dict[str, str], concurrency: int, count: int, deadline: float | None
) -> tuple[list[float], list[str]]:
    """`concurrency` clients sending back to back until `count` requests (or the deadline)."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0

    async def one_client() -> None:
        nonlocal issued
        while (issued < count) if deadline is None else (time.perf_counter() < deadline):
            issued += 1
            start = time.perf_counter()
            try:
                async with client.post(path, data=body, headers=headers) as response:
                    answer = await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(f"{response.status}: {answer[:200].decode(errors='replace')}")
            except Exception as e:  # a transport error is a failed request, not the end of the run
                errors.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies, errors


@dataclass
class _Pool:
    """One (concurrency, drop) cell's timed requests, over every round."""

    latencies: list[float] = field(default_factory=list)  # seconds, of the requests answered 200
    errors: list[str] = field(default_factory=list)  # one line per failed request
    wall: float = 0.0  # seconds spent sending the timed requests
    p50s: list[float | None] = field(default_factory=list)  # seconds, one per round (None: every request failed)


@dataclass
class _Alone:
    """ONNX Runtime alone at one drop ratio, over every round."""

    seconds: list[float] = field(default_factory=list)  # every timed call
    medians: list[float] = field(default_factory=list)  # ms, one per round


async def _bench(
    url: str, cfg: HttpBenchConfig, local: ServedModel | None, progress: Progress | None, log: Log
) -> dict[str, Any]:
    """Every cell loaded, then summed up: `bench_http` without the argument checks."""
    import aiohttp

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    connector = aiohttp.TCPConnector(limit=max(cfg.concurrency))
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector, timeout=timeout) as client:
        size = await _model_input_size(client, cfg, url)
        images = np.random.default_rng(cfg.seed).standard_normal((cfg.batch, 3, size, size), dtype=np.float32)
        bodies = {drop: infer_body(images, drop, cfg.binary) for drop in cfg.drops}
        pools, alone = await _run_rounds(client, cfg, images, bodies, local, progress)
    cells = [_cell(concurrency, drop, pool, cfg.batch) for (concurrency, drop), pool in pools.items()]
    _add_p50_ratios(cells)
    for cell in cells:
        log(_row(cell))
    result: dict[str, Any] = {"url": url, "body_bytes": {str(d): len(b[0]) for d, b in bodies.items()}, "cells": cells}
    if local is not None:
        result.update(_http_overhead(cfg.batch, cells, alone, log))
    return result


async def _run_rounds(
    client,
    cfg: HttpBenchConfig,
    images: np.ndarray,
    bodies: dict[float, Body],
    local: ServedModel | None,
    progress: Progress | None,
) -> tuple[dict[tuple[int, float], _Pool], dict[float, _Alone]]:
    """Every cell visited `cfg.rounds` times, round-robin; with `local`, ONNX Runtime alone is
    timed just before each concurrency-1 cell, its HTTP twin."""
    keys = [(c, d) for c in cfg.concurrency for d in cfg.drops]
    pools = {key: _Pool() for key in keys}
    alone = {drop: _Alone() for drop in cfg.drops}
    rounds = max(1, cfg.rounds)
    done, total = 0, rounds * len(keys)
    report(progress, PROGRESS_LABEL, done, total)
    for round_ in range(rounds):
        for concurrency, drop in keys:
            if local is not None and concurrency == 1:
                seconds = _time_runs(local, images, drop, max(50, min(cfg.requests, 500)) // rounds or 1)
                alone[drop].seconds += seconds
                alone[drop].medians.append(1000 * float(np.median(seconds)))
            await _visit(client, cfg, concurrency, bodies[drop], pools[(concurrency, drop)], round_, rounds)
            done += 1
            report(progress, PROGRESS_LABEL, done, total, f"concurrency {concurrency}, drop {drop:g}")
    return pools, alone


async def _visit(client, cfg: HttpBenchConfig, concurrency: int, body: Body, pool: _Pool, round_: int, rounds: int) -> None:
    """One round's share of a cell: warm-up requests, then the timed ones, added to `pool`."""
    data, headers = body
    path = f"/v2/models/{cfg.model}/infer"
    # Warm-up at the cell's concurrency: connections open, the server's batching settled.
    await _closed_loop(client, path, data, headers, concurrency, max(1, cfg.warmup // rounds), None)
    start = time.perf_counter()
    share = cfg.requests // rounds + (round_ < cfg.requests % rounds)  # the shares add up to cfg.requests
    deadline = start + cfg.duration / rounds if cfg.duration is not None else None
    latencies, errors = await _closed_loop(client, path, data, headers, concurrency, share, deadline)
    pool.wall += time.perf_counter() - start
    pool.latencies += latencies
    pool.errors += errors
    pool.p50s.append(float(np.median(latencies)) if latencies else None)


def _cell(concurrency: int, drop: float, pool: _Pool, batch: int) -> dict[str, Any]:
    """A cell's figures: latency percentiles in ms, throughput, errors, the p50 of every round."""
    latencies, errors = pool.latencies, pool.errors
    cell = {"concurrency": concurrency, "drop": drop, "requests": len(latencies) + len(errors), "errors": len(errors)}
    if latencies:
        stats = percentiles(latencies)
        cell.update({"p50_ms": stats["median_ms"], **{k: stats[k] for k in ("p90_ms", "p95_ms", "p99_ms", "mean_ms")}})
    cell["throughput_rps"] = len(latencies) / pool.wall
    cell["images_per_second"] = len(latencies) * batch / pool.wall
    cell["round_p50_ms"] = [None if x is None else 1000 * x for x in pool.p50s]
    if errors:
        cell["first_error"] = errors[0]
    return cell


def _add_p50_ratios(cells: list[dict[str, Any]]) -> None:
    """p50_vs_drop0: the median over rounds of each round's p50 over drop 0's, at the same concurrency."""
    for cell in cells:
        base = next((c for c in cells if c["concurrency"] == cell["concurrency"] and c["drop"] == 0.0 and "p50_ms" in c), None)
        ratios = [x / b for x, b in zip(cell["round_p50_ms"], base["round_p50_ms"]) if x and b] if base else []
        cell["p50_vs_drop0"] = float(np.median(ratios)) if ratios else None  # per-round ratios: side by side


def _http_overhead(batch: int, cells: list[dict[str, Any]], alone: dict[float, _Alone], log: Log) -> dict[str, Any]:
    """ONNX Runtime alone per drop, and the HTTP overhead at concurrency 1: the median over rounds of
    the server's p50 minus ONNX Runtime's median, each pair measured side by side."""
    result: dict[str, Any] = {
        "local": [
            {"batch": batch, "drop": drop, **percentiles(t.seconds), "round_median_ms": t.medians}
            for drop, t in alone.items()
            if t.seconds
        ],
        "http_overhead_ms": {},
        "http_overhead_ms_per_round": {},
    }
    for drop, t in alone.items():
        http = next((c for c in cells if c["concurrency"] == 1 and c["drop"] == drop and "p50_ms" in c), None)
        if http is None:
            continue
        per_round = [h - m for h, m in zip(http["round_p50_ms"], t.medians) if h is not None]
        result["http_overhead_ms"][str(drop)] = float(np.median(per_round))
        result["http_overhead_ms_per_round"][str(drop)] = per_round
        log(
            f"drop {drop:<4g} ONNX Runtime median {float(np.median(t.medians)):.2f} ms, HTTP p50 {http['p50_ms']:.2f} ms: "
            f"overhead {result['http_overhead_ms'][str(drop)]:.2f} ms (median of {len(per_round)} side-by-side rounds)"
        )
    return result


def bench_http(
    url: str,
    cfg: HttpBenchConfig = HttpBenchConfig(),
    *,
    local: str | Path | None = None,
    threads: int | None = None,
    spinning: bool = False,
    progress: Progress | None = None,
    log: Log = lambda line: None,
) -> dict[str, Any]:
    """Load `url` (a `lotus serve` or any OIP v2 server) at every (concurrency, drop) cell.

    Args:
        local: also time this ONNX model in ONNX Runtime alone (same batch and drops), just before
            each concurrency-1 cell of every round, and report the HTTP overhead: the median over
            rounds of server p50 minus ONNX Runtime's median, each pair measured side by side.
        threads, spinning: ONNX Runtime settings of the local timing (use the server's).
        progress: told of every cell visited, as "load cells", done of total visits.
        log: gets a line per cell (and per HTTP overhead) once the load is over.
    """
    if cfg.requests < 1 and cfg.duration is None:
        raise LotusError("--requests must be at least 1")
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    model = None
    if local is not None:
        from serve.model import ServedModel

        model = ServedModel.load(local, threads, spinning)
    result = asyncio.run(_bench(url, cfg, model, progress, log))
    result["config"] = asdict(cfg) | {"api_key": "***" if cfg.api_key else None}
    return result


def run_http_bench(
    url: str,
    cfg: HttpBenchConfig,
    out: str | Path,
    plot: str | Path | None = None,
    *,
    local: str | Path | None = None,
    threads: int | None = None,
    spinning: bool = False,
    progress: Progress | None = None,
    log: Log = lambda line: None,
) -> tuple[dict[str, Any], Path]:
    """`bench_http`, then its results written to `out` as JSON and drawn into `plot` (default: `out`
    with .png). Returns the results and the plot's path."""
    result = bench_http(url, cfg, local=local, threads=threads, spinning=spinning, progress=progress, log=log)
    out = Path(out)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result, save_plot(result, plot or out.with_suffix(".png"))


def _time_runs(model: ServedModel, images: np.ndarray, drop: float, runs: int, warmup: int = 5) -> list[float]:
    """Seconds of `runs` ONNX Runtime calls, one after another, on the session the server makes
    (serve.model.serving_session): the baseline the HTTP overhead is measured against.

    Not lotus.bench.bench_local: its session lets idle threads spin, which the server's does not,
    and on a busy machine that alone moves the median by milliseconds either way.
    """
    return time_calls(lambda: model.run(images, drop), runs, warmup)


def _row(cell: dict[str, Any]) -> str:
    if "p50_ms" not in cell:
        return (
            f"{cell['concurrency']:>5} {cell['drop']:>5g}  every request failed ({cell['errors']}): {cell.get('first_error', '')}"
        )
    ratio = f"{cell['p50_vs_drop0']:.3f}" if cell.get("p50_vs_drop0") is not None else "-"
    return (
        f"{cell['concurrency']:>5} {cell['drop']:>5g} {cell['p50_ms']:>8.2f} {cell['p90_ms']:>8.2f} {cell['p95_ms']:>8.2f} "
        f"{cell['p99_ms']:>8.2f} {cell['throughput_rps']:>9.1f} {cell['errors']:>6} {ratio:>8}"
    )


def format_table(result: dict[str, Any]) -> str:
    """The cells as a perf_analyzer-like table (latencies in ms, throughput in requests/s)."""
    lines = [f"{'conc':>5} {'drop':>5} {'p50':>8} {'p90':>8} {'p95':>8} {'p99':>8} {'req/s':>9} {'errors':>6} {'x drop0':>8}"]
    lines += [_row(cell) for cell in result["cells"]]
    for drop, overhead in result.get("http_overhead_ms", {}).items():
        lines.append(f"HTTP overhead at concurrency 1, drop {drop}: {overhead:.2f} ms (server p50 - ONNX Runtime median)")
    return "\n".join(lines)


def save_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Latency against drop ratio, one line per concurrency: p50 (shaded to p99, log scale) on
    the left, p50 relative to drop 0 on the right; ONNX Runtime alone dashed when timed."""
    from lotus.plots import pyplot

    plt = pyplot()
    path = Path(path)
    fig, (absolute, relative) = plt.subplots(1, 2, figsize=(10, 4))
    for concurrency in sorted({c["concurrency"] for c in result["cells"]}):
        cells = [c for c in result["cells"] if c["concurrency"] == concurrency and "p50_ms" in c]
        drops = [c["drop"] for c in cells]
        (line,) = absolute.plot(drops, [c["p50_ms"] for c in cells], marker="o", label=f"concurrency {concurrency}")
        absolute.fill_between(
            drops, [c["p50_ms"] for c in cells], [c["p99_ms"] for c in cells], color=line.get_color(), alpha=0.15
        )
        if all(c.get("p50_vs_drop0") is not None for c in cells):
            relative.plot(
                drops, [c["p50_vs_drop0"] for c in cells], marker="o", color=line.get_color(), label=f"concurrency {concurrency}"
            )
    local = result.get("local")
    if local:
        absolute.plot([c["drop"] for c in local], [c["median_ms"] for c in local], "k--", marker="x", label="ONNX Runtime alone")
        base = next((c["median_ms"] for c in local if c["drop"] == 0.0), None)
        if base:
            relative.plot(
                [c["drop"] for c in local], [c["median_ms"] / base for c in local], "k--", marker="x", label="ONNX Runtime alone"
            )
    absolute.set_yscale("log")
    absolute.set_ylabel("p50 latency per request (ms), shaded to p99")
    relative.set_ylabel("p50 latency / p50 at drop 0")
    for ax in (absolute, relative):
        ax.set_xlabel("drop ratio (fraction of patches skipped)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("LOTUS serving latency against drop ratio")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
