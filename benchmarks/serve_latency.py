"""Serving latency of an exported LOTUS model over HTTP, at several concurrencies and drop ratios.

Starts two `lotus serve` (real uvicorn subprocesses) on the model, one batching and one with
--no-batching; both idle when not loaded (no spinning threads). Loads the batching one with
`lotus bench`'s load generator (serve/bench.py) at concurrency 1, 4, 16 and drop 0, 0.1, 0.3, 0.5
in --rounds round-robin rounds (so the p50 ratios are side by side), times ONNX Runtime alone on
the same model for the HTTP overhead, then measures the batching gain side by side: rounds at
concurrency 16 alternating between the two servers, the gain being the median of the per-round
throughput ratios. Prints the checks:

- errors at concurrency 16 (0 over at least 2,000 requests),
- p50 at drop 0.5 over p50 at drop 0 (<= 0.65),
- HTTP overhead at concurrency 1: server p50 minus ONNX Runtime median (<= 2 ms),
- throughput at concurrency 16 with batching over without (>= 1.5).

    python benchmarks/serve_latency.py [MODEL.onnx] [--requests 500] [--threads N]
    python benchmarks/serve_latency.py --synthetic   # a random ViT-Tiny at CIFAR-10's shape

Latency does not depend on the weights, so --synthetic (the CIFAR-10 model's graph with random
weights) gives the same timings when no compressed CIFAR-10 run is at hand; the JSON says which
model was timed. Writes benchmarks/results/serve_latency.json and serve_latency.png.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from common import RESULTS, ROOT, stop_server, wait_until_ready, write_result

from serve.bench import HttpBenchConfig, bench_http, format_table, save_plot


def synthetic_model(out: Path, depth: int | None = None) -> Path:
    """ViT-Tiny (width 192, depth 12, or `depth`) on 32x32 images with 4x4 patches, random weights, exported."""
    import torch

    from lotus.checkpoint import save_model
    from lotus.export import ExportConfig, export_onnx
    from lotus.vit import ModelConfig, build_model

    cfg = ModelConfig(num_classes=10, img_size=32, patch_size=4, depth=depth, drop_path_rate=0.0)
    torch.manual_seed(0)
    pre = {
        "img_size": 32,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.247, 0.2435, 0.2616],
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "dataset": "cifar10",
    }
    save_model(out / "run", build_model(cfg).eval(), cfg, pre, None, sparsity={"overall": 0.0})
    export_onnx(out / "run", out / "model.onnx", None, ExportConfig(verify=False))
    return out / "model.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lotus serve MODEL` in a subprocess, its log in a temporary file, ready when /v2/health/ready says so."""

    def __init__(self, model: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="lotus-serve-latency-")) / "serve.log"
        lotus = Path(sys.executable).with_name("lotus")
        command = [str(lotus), "serve", str(model), "--port", str(self.port), "--no-access-log", *flags]
        with self.log_path.open("w") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_until_ready(self.process, self.url, self.log_path)

    def stop(self) -> None:
        stop_server(self.process)


def log(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, help="Exported model.onnx (default: the latest run's).")
    p.add_argument("--synthetic", action="store_true", help="Time a random ViT-Tiny at CIFAR-10's shape instead.")
    p.add_argument("--requests", type=int, default=500, help="Timed requests per (concurrency, drop) cell.")
    p.add_argument("--rounds", type=int, default=5, help="Round-robin rounds the requests are split into.")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads of the server and the local timing.")
    p.add_argument(
        "--spinning", action="store_true", help="Let the server's ONNX Runtime threads spin-wait (lotus serve --spinning)."
    )
    p.add_argument("--binary", action="store_true", help="Send tensors with the binary extension instead of JSON.")
    p.add_argument(
        "--tag", default="", help="Suffix of the result files (serve_latency_TAG.json), to keep several models' figures."
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            model = synthetic_model(Path(tmp))
        else:
            from lotus.checkpoint import latest_run

            model = args.model or latest_run(ROOT / "runs", containing="model.onnx") / "model.onnx"
        threads = (["--threads", str(args.threads)] if args.threads else []) + (["--spinning"] if args.spinning else [])
        cfg = HttpBenchConfig(requests=args.requests, binary=args.binary, rounds=args.rounds)

        log(f"model {model}; {os.cpu_count()} cores")
        batching_server, plain_server = Server(model, *threads), Server(model, "--no-batching", *threads)
        try:
            log("batching on: every cell, round-robin")
            batched = bench_http(batching_server.url, cfg, local=model, threads=args.threads, spinning=args.spinning, log=log)
            log("batching on and off, concurrency 16, alternating")
            c16 = replace(cfg, concurrency=(16,), drops=(0.0, 0.5), requests=-(-args.requests // args.rounds), rounds=1)
            pairs = [(bench_http(batching_server.url, c16), bench_http(plain_server.url, c16)) for _ in range(args.rounds)]
        finally:
            batching_server.stop()
            plain_server.stop()

    print(format_table(batched))
    gains = {
        str(drop): [on["cells"][i]["throughput_rps"] / off["cells"][i]["throughput_rps"] for on, off in pairs]
        for i, drop in enumerate(c16.drops)
    }
    unbatched = {str(drop): [off["cells"][i] for _, off in pairs] for i, drop in enumerate(c16.drops)}
    c16_cells = [c for c in batched["cells"] if c["concurrency"] == 16]
    checks = {
        "requests_at_concurrency_16": sum(c["requests"] for c in c16_cells),
        "errors_at_concurrency_16": sum(c["errors"] for c in c16_cells),
        "p50_drop_0.5_over_drop_0": {
            str(k): next(c["p50_vs_drop0"] for c in batched["cells"] if c["concurrency"] == k and c["drop"] == 0.5)
            for k in (1, 4, 16)
        },
        "http_overhead_ms_concurrency_1": batched.get("http_overhead_ms"),
        "throughput_gain_batching_concurrency_16": {drop: statistics.median(g) for drop, g in gains.items()},
        "throughput_gain_per_round": gains,
    }
    for key, value in checks.items():
        print(f"{key}: {value}")
    print(
        "no batching, concurrency 16: "
        + ", ".join(
            f"drop {drop} {statistics.median(c['throughput_rps'] for c in cells):.1f} req/s" for drop, cells in unbatched.items()
        )
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "serve_latency" + (f"_{args.tag}" if args.tag else "")
    plot = save_plot(batched, RESULTS / f"{name}.png")
    print(f"wrote {plot}")
    write_result(
        name,
        {
            "model": str(model),
            "synthetic": args.synthetic,
            "spinning": args.spinning,
            "cores": os.cpu_count(),
            "checks": checks,
            "batching": batched,
            "c16_pairs": [{"batching": on, "no_batching": off} for on, off in pairs],
        },
    )


if __name__ == "__main__":
    main()
