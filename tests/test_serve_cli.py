"""`lotus serve` and `lotus bench URL` as users run them: a real server process, the load
generator against a live uvicorn, its table, JSON and plot."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import live_server
from typer.testing import CliRunner

from cli.main import app
from lotus import LotusError
from serve.bench import HttpBenchConfig, bench_http, format_table, run_http_bench, save_plot
from serve.settings import Settings

LOTUS = str(Path(sys.executable).with_name("lotus"))
SMALL = HttpBenchConfig(concurrency=(1, 4), drops=(0.0, 0.5), requests=12, warmup=2)


@pytest.fixture(scope="module")
def server(tiny_onnx):
    with live_server(Settings(model=tiny_onnx, api_key=None)) as url:
        yield url


def test_bench_url_reports_every_cell_and_the_http_overhead(server, tiny_onnx, tmp_path):
    result = bench_http(server, SMALL, local=tiny_onnx, threads=1)
    assert [(c["concurrency"], c["drop"]) for c in result["cells"]] == [(1, 0.0), (1, 0.5), (4, 0.0), (4, 0.5)]
    for cell in result["cells"]:
        assert cell["requests"] == 12 and cell["errors"] == 0
        assert 0 < cell["p50_ms"] <= cell["p90_ms"] <= cell["p95_ms"] <= cell["p99_ms"]
        assert cell["throughput_rps"] > 0
    assert result["cells"][0]["p50_vs_drop0"] == 1.0
    assert [c["drop"] for c in result["local"]] == [0.0, 0.5] and all(c["median_ms"] > 0 for c in result["local"])
    assert set(result["http_overhead_ms"]) == {"0.0", "0.5"}
    json.dumps(result)  # the CLI writes it as is
    table = format_table(result)
    assert "p99" in table and "HTTP overhead at concurrency 1, drop 0.0" in table
    assert save_plot(result, tmp_path / "latency.png").stat().st_size > 1000

    binary = bench_http(server, HttpBenchConfig(concurrency=(2,), drops=(0.3,), requests=6, warmup=1, binary=True, batch=3))
    assert binary["cells"][0]["errors"] == 0 and binary["cells"][0]["images_per_second"] > 0
    timed = bench_http(server, HttpBenchConfig(concurrency=(2,), drops=(0.0,), duration=0.3, warmup=1))
    assert timed["cells"][0]["requests"] > 2 and timed["cells"][0]["errors"] == 0


def test_run_http_bench_writes_json_and_plot_and_reports_progress(server, tmp_path):
    calls = []
    result, plot = run_http_bench(
        server,
        HttpBenchConfig(concurrency=(1,), drops=(0.0, 0.5), requests=3, warmup=1, rounds=2),
        tmp_path / "bench.json",
        progress=lambda label, done, total, status: calls.append((label, done, total)),
    )
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert plot == tmp_path / "bench.png" and plot.stat().st_size > 1000
    assert calls == [("load cells", done, 4) for done in range(5)]  # one call per cell visited, after a 0 of 4


def test_bench_url_rounds_split_every_cell_and_ratio_side_by_side(server):
    result = bench_http(server, HttpBenchConfig(concurrency=(1, 2), drops=(0.0, 0.5), requests=7, warmup=1, rounds=3))
    for cell in result["cells"]:
        assert cell["requests"] == 7 and cell["errors"] == 0  # shares of 3, 2 and 2 add up to the count asked for
        assert len(cell["round_p50_ms"]) == 3 and all(p > 0 for p in cell["round_p50_ms"])
    drop0, drop5 = result["cells"][0], result["cells"][1]
    assert drop0["p50_vs_drop0"] == 1.0
    ratios = sorted(x / b for x, b in zip(drop5["round_p50_ms"], drop0["round_p50_ms"]))
    assert drop5["p50_vs_drop0"] == pytest.approx(ratios[1])  # the median of the per-round ratios


def test_bench_url_http_overhead_is_measured_side_by_side_in_every_round(server, tiny_onnx):
    result = bench_http(
        server, HttpBenchConfig(concurrency=(1, 2), drops=(0.0,), requests=9, warmup=1, rounds=3), local=tiny_onnx, threads=1
    )
    http = result["cells"][0]
    (alone,) = result["local"]
    assert len(alone["round_median_ms"]) == 3 and all(m > 0 for m in alone["round_median_ms"])  # ONNX Runtime timed in each round
    per_round = [h - m for h, m in zip(http["round_p50_ms"], alone["round_median_ms"])]
    assert result["http_overhead_ms_per_round"]["0.0"] == pytest.approx(per_round)
    assert result["http_overhead_ms"]["0.0"] == pytest.approx(sorted(per_round)[1])


def test_bench_url_errors_are_one_line(server, tiny_onnx):
    with pytest.raises(LotusError, match="cannot reach"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        bench_http(f"127.0.0.1:{free}", SMALL)
    with pytest.raises(LotusError, match="answered 404"):
        bench_http(server, HttpBenchConfig(model="nope"))
    with live_server(Settings(model=tiny_onnx, api_key="k")) as keyed:
        with pytest.raises(LotusError, match="API key"):
            bench_http(keyed, SMALL)
        ok = bench_http(keyed, HttpBenchConfig(concurrency=(1,), drops=(0.0,), requests=3, warmup=0, api_key="k"))
        assert ok["cells"][0]["errors"] == 0


def test_lotus_bench_url_writes_table_json_and_plot(server, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            server,
            "--concurrency",
            "1,2",
            "--drop",
            "0,0.5",
            "--requests",
            "6",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "--out",
            str(out),
        ],
        env={"LOTUS_API_KEY": ""},
    )
    assert result.exit_code == 0, result.output
    assert "p50" in result.stdout and len(result.stdout.strip().splitlines()) == 5  # header + 4 cells
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 4 and all(c["requests"] == 6 and len(c["round_p50_ms"]) == 2 for c in cells)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_lotus_serve_runs_a_model_until_stopped(tiny_onnx, tmp_path):
    """The real console script: flags -> environment -> uvicorn's app factory -> answers."""
    shutil.copy(tiny_onnx, tmp_path / "model.onnx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LOTUS_API_KEY": "k"}
    proc = subprocess.Popen(
        [
            LOTUS,
            "serve",
            str(tmp_path / "model.onnx"),
            "--port",
            str(port),
            "--name",
            "digits",
            "--max-images",
            "2",
            "--spinning",
            "--no-access-log",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        key = {"Authorization": "Bearer k"}
        x = np.zeros((3, 3, 16, 16), dtype=np.float32)
        body = {"inputs": [{"name": "pixel_values", "shape": [3, 3, 16, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
        assert httpx.post(url + "/v2/models/digits/infer", json=body, headers=key).status_code == 413  # --max-images 2
        body["inputs"][0].update(shape=[2, 3, 16, 16], data=x[:2].ravel().tolist())
        response = httpx.post(url + "/v2/models/digits/infer", json=body, headers=key)
        assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [2, 10]
        assert httpx.post(url + "/v2/models/digits/infer", json=body).status_code == 401  # LOTUS_API_KEY reached the worker
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode in (0, -15), output  # uvicorn re-raises SIGTERM once it has shut down
    assert "serving" in output and "'digits'" in output and "Application shutdown complete" in output
    assert "spinning on" in output  # --spinning reached the worker's ONNX Runtime session


def test_lotus_serve_and_bench_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and "not found" in result.stderr and "Traceback" not in result.stderr
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.onnx"), "--max-batch", "0"])
    assert result.exit_code == 2 and "max_batch" in result.stderr
    result = CliRunner().invoke(app, ["bench"])
    assert result.exit_code == 2 and "pass a URL" in result.stderr
