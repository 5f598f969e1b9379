"""Latency of an exported LOTUS model in ONNX Runtime, without HTTP (`lotus bench --local`).

One session alive at a time (several spinning sessions in one process distort each other's
timings), warm-up runs first, then at least `runs` timed runs per (batch, drop) cell; the median,
p90 and p99 are reported. Cells are timed in order, each on a fresh batch of random inputs
(speed does not depend on the pixel values).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lotus.errors import LotusError


@dataclass(frozen=True)
class LocalBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 64)  # images per run
    drops: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)  # drop ratios
    runs: int = 50  # timed runs per cell (at least)
    warmup: int = 5  # untimed runs per cell
    threads: int | None = None  # ONNX Runtime intra-op threads; None = its default (all cores)


def percentiles(seconds: list[float]) -> dict[str, float]:
    """The median, p90, p95, p99 and mean of `seconds`, in ms, and how many there are."""
    ms = np.array(seconds) * 1000
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "runs": len(ms),
    }


def time_calls(call: Callable[[], object], runs: int, warmup: int = 5) -> list[float]:
    """Seconds of each of `runs` calls of `call`, one after another, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_local(
    path: str | Path, cfg: LocalBenchConfig = LocalBenchConfig(), *, log: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Time `path` at every (batch, drop); returns the cells and their ratios to drop 0."""
    from lotus.runtime import graph_feed, lotus_metadata, ort_session

    path = Path(path)
    meta = lotus_metadata(path, ("img_size",))
    size = int(meta["img_size"])
    session = ort_session(path, cfg.threads)
    if "merge_per_block" in meta and any(cfg.drops):
        raise LotusError(f"{path} takes no drop (a token-merging graph: it merges at a fixed r): time it with --drop 0")
    rng = np.random.default_rng(0)
    cells = []
    for batch in cfg.batch_sizes:
        images = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        for drop in cfg.drops:
            feed = graph_feed(session, images, drop)
            times = time_calls(lambda feed=feed: session.run(None, feed), cfg.runs, cfg.warmup)
            cell = {"batch": batch, "drop": drop, **percentiles(times)}
            cell["images_per_second"] = batch / (cell["median_ms"] / 1000)
            cells.append(cell)
            log(
                f"batch {batch:>3} drop {drop:<4} median {cell['median_ms']:8.2f} ms  p90 {cell['p90_ms']:8.2f}  p99 {cell['p99_ms']:8.2f}"
            )
    for cell in cells:
        base = next(c for c in cells if c["batch"] == cell["batch"] and c["drop"] == 0.0) if 0.0 in cfg.drops else None
        cell["vs_drop0"] = cell["median_ms"] / base["median_ms"] if base else None
    return {"model": str(path), "providers": session.get_providers(), "metadata": meta, "config": cfg.__dict__, "cells": cells}


def format_local_table(result: dict[str, Any]) -> str:
    """The cells of `bench_local` as a table: latencies in ms, throughput in images/s, the median's
    ratio to drop 0 at the same batch size ("-" when drop 0 was not timed)."""
    lines = [f"{'batch':>5} {'drop':>5} {'median ms':>10} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>8} {'x drop 0':>8}"]
    for c in result["cells"]:
        ratio = f"{c['vs_drop0']:.3f}" if c.get("vs_drop0") is not None else "-"
        lines.append(
            f"{c['batch']:>5} {c['drop']:>5g} {c['median_ms']:>10.2f} {c['p90_ms']:>9.2f} {c['p99_ms']:>9.2f} "
            f"{c['images_per_second']:>8.0f} {ratio:>8}"
        )
    return "\n".join(lines)
