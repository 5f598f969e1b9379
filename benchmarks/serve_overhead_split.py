"""Where the HTTP overhead goes: the server's time around ONNX Runtime, per model.

For each model, in alternating runs: a `lotus serve` subprocess (real uvicorn) is loaded by
`lotus bench URL` at concurrency 1, drop 0, and the server's own Prometheus metrics (read
before and after) give the mean time a request spends in the server (from its first middleware)
and the mean time of an ONNX Runtime call. Their difference is the server's work around the
model; ONNX Runtime alone (the server's session settings, in this process) shows whether the
model itself runs slower inside the server. Run with the CIFAR-10 model and the same graph cut
to one block (`--one-block`): the same HTTP work around a bigger model.

    python benchmarks/serve_overhead_split.py MODEL.onnx --one-block [--runs 3] [--requests 600]
"""

from __future__ import annotations

import argparse
import tempfile
import urllib.request
from pathlib import Path

from common import write_result
from serve_latency import Server, synthetic_model

from serve.bench import HttpBenchConfig, bench_http


def server_totals(url: str) -> dict[str, float]:
    """Sums and counts of the infer route's request time and of ONNX Runtime calls."""
    totals = {}
    for line in urllib.request.urlopen(url + "/metrics", timeout=10).read().decode().splitlines():
        for name in ("lotus_request_duration_seconds", "lotus_inference_duration_seconds"):
            for kind in ("sum", "count"):
                key = f"{name}_{kind}"
                if line.startswith(key) and (line.startswith(key + " ") or "infer" in line):
                    totals[key] = float(line.rsplit(" ", 1)[1])
    return totals


def one_run(model: Path, requests: int) -> dict[str, float]:
    server = Server(model)
    try:
        before = server_totals(server.url)
        result = bench_http(server.url, HttpBenchConfig(concurrency=(1,), drops=(0.0,), requests=requests, rounds=3), local=model)
        after = server_totals(server.url)
    finally:
        server.stop()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    request = 1000 * delta["lotus_request_duration_seconds_sum"] / delta["lotus_request_duration_seconds_count"]
    inference = 1000 * delta["lotus_inference_duration_seconds_sum"] / delta["lotus_inference_duration_seconds_count"]
    cell, (alone,) = result["cells"][0], result["local"]
    return {
        "client_p50_ms": cell["p50_ms"],
        "server_request_mean_ms": request,
        "server_onnxruntime_mean_ms": inference,
        "server_around_model_ms": request - inference,
        "onnxruntime_alone_mean_ms": alone["mean_ms"],
        "http_overhead_ms": result["http_overhead_ms"]["0.0"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="Exported model.onnx.")
    p.add_argument("--one-block", action="store_true", help="Also run a one-block ViT of the same input shape, alternating.")
    p.add_argument("--runs", type=int, default=3, help="Runs per model.")
    p.add_argument("--requests", type=int, default=600, help="Timed requests per run.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {"model": args.model}
        if args.one_block:
            models["one_block"] = synthetic_model(Path(tmp), depth=1)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for i in range(args.runs):
            for name, path in models.items():
                runs[name].append(one_run(path, args.requests))
                r = runs[name][-1]
                print(
                    f"run {i + 1} {name:>9}: client p50 {r['client_p50_ms']:6.2f} ms, server {r['server_request_mean_ms']:6.2f} ms "
                    f"of which ONNX Runtime {r['server_onnxruntime_mean_ms']:6.2f} (alone {r['onnxruntime_alone_mean_ms']:6.2f}): "
                    f"around the model {r['server_around_model_ms']:.2f} ms",
                    flush=True,
                )
    write_result("serve_overhead_split", {"model": str(args.model), "runs": runs})


if __name__ == "__main__":
    main()
