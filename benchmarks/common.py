"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
# LOTUS_BENCH_RESULTS sends results elsewhere (e.g. a GPU machine's output folder)
RESULTS = Path(os.environ.get("LOTUS_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


SHARED_TINY_IMAGENET = ROOT.parent / "shared" / "data" / "tiny-imagenet-100.tar.gz"


def cifar10_folder(archive: Path = SHARED_CIFAR, dest: Path = ROOT / "data") -> Path:
    """Unpack the CIFAR-10 ImageFolder archive once; returns the root holding train/ and test/."""
    return unpacked_folder(archive, dest / "cifar10", also=(dest,))


def tiny_imagenet_folder(archive: Path = SHARED_TINY_IMAGENET, dest: Path = ROOT / "data") -> Path:
    """Unpack the Tiny-ImageNet-100 archive once; returns the root holding train/, test/ and boxes.tsv."""
    return unpacked_folder(archive, dest / "tiny-imagenet-100", into=dest)  # the archive holds its top folder


def _image_root(folder: Path) -> Path | None:
    """`folder` or the folder just under it that holds train/ and test/, if any."""
    for candidate in (folder, *(sorted(folder.iterdir()) if folder.is_dir() else ())):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def unpacked_folder(archive: Path, out: Path, into: Path | None = None, also: tuple[Path, ...] = ()) -> Path:
    """The ImageFolder root at `out` (or just under it, or under one of `also`), unpacking
    `archive` into `into` (default `out`) the first time. Where the archive is missing, its parts
    in `into` (NAME.partNN, written by `split -b`: how a machine that takes files of limited size
    receives it) are read in order."""
    into = into or out
    for folder in (out, *also):
        if root := _image_root(folder):
            return root
    parts = sorted(into.glob(f"{archive.name}.part*"))
    if not archive.is_file() and not parts:
        raise SystemExit(f"archive {archive} not found (nor its parts {into}/{archive.name}.part*): pass --archive PATH")
    into.mkdir(parents=True, exist_ok=True)
    if archive.is_file():
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    else:
        with (
            subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE) as cat,
            tarfile.open(fileobj=cat.stdout, mode="r|gz") as tar,
        ):
            tar.extractall(into, filter="data")
    if root := _image_root(out):
        return root
    raise SystemExit(f"{archive} does not unpack to train/ and test/ folders")


def cpu_model() -> dict:
    """The CPU's model name and the vector and matrix extensions that set how fast int8 and fp32
    matrix products run: latency ratios measured on one CPU need not hold on another."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    return {
        "cpu_model": name,
        "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8"}),
    }


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        **cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def shown(path: str | Path) -> str:
    """A path as results record it: relative to the repository when under it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def wait_until_ready(process: subprocess.Popen, url: str, log_path: Path, seconds: float = 120) -> None:
    """Wait for the `lotus serve` in `process` to answer 200 on /v2/health/ready; on failure, exit
    with the end of its log (a file, not a pipe: a chatty server never blocks on it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"lotus serve exited:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"lotus serve did not become ready in {seconds:g} s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def generated_folder(root: Path, train: int, test: int = 200, size: int = 224, classes: int = 10) -> Path:
    """An ImageFolder of `size`-px JPEGs (smooth colour fields with noise, about 15 KB each, as
    photos compress), made once per (train, size) and reused: the shape of a real dataset's files
    without needing one. Each file is one of 64 drawn pictures, rolled by a random offset."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    pool = []
    for _ in range(64):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        field = np.stack([a[k] * x + b[k] * y + c[k] * x * y for k in range(3)], -1)
        pool.append((128 + 60 * field + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8))
    for split, count in (("train", train), ("test", test)):
        for i in range(count):
            folder = root / split / f"class{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.roll(pool[rng.integers(64)], tuple(rng.integers(0, size, 2)), axis=(0, 1))
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=85)
    done.touch()
    return root


def finetune(
    checkpoint: str | Path, data_cfg, base, out: Path, epochs: int, seed: int = 0, tickets: Path | None = None, **changes
) -> dict:
    """`checkpoint` fine-tuned for `epochs` at half the learning rate of `base` (its TrainConfig),
    0.5 warm-up epochs, into `out` (resumed, so a finished run is read, not redone); `changes`
    are further TrainConfig fields (e.g. drop_aware)."""
    from dataclasses import replace

    from lotus.train import train
    from lotus.vit import ModelConfig

    cfg = replace(base, epochs=epochs, lr=base.lr / 2, warmup_epochs=0.5, seed=seed, **changes)
    history = finished(out, data_cfg, cfg, checkpoint, tickets)
    if history is None:
        history = train(data_cfg, ModelConfig(), cfg, out, init_checkpoint=checkpoint, tickets=tickets, resume=True)
    return {
        "run": str(out),
        "seed": seed,
        "test_accuracy": history[-1]["test_accuracy"],
        "epoch_seconds": [h["epoch_seconds"] for h in history],
    }


def finished(out: Path, data_cfg, cfg, checkpoint: str | Path, tickets: Path | None) -> list[dict] | None:
    """The metrics of a run in `out` that finished all of `cfg`'s epochs from `checkpoint`, with
    these training settings, data and tickets, read without loading its data; None for anything
    else, which `train(resume=True)` then resumes, or refuses with the setting that differs."""
    from dataclasses import asdict

    from lotus.train import METRICS_FILE, STATE_FILE

    state_file, metrics_file = out / f"{STATE_FILE}.json", out / METRICS_FILE
    if not (state_file.is_file() and metrics_file.is_file() and (out / "model.json").is_file()):
        return None
    run = json.loads(state_file.read_text())["run"]
    data = {k: v for k, v in json.loads(json.dumps(asdict(data_cfg))).items() if k not in ("workers", "img_size", "crop_pct")}
    same = (
        run["train"] == json.loads(json.dumps(asdict(cfg)))
        and run["init_checkpoint"] == str(checkpoint)
        and (run["tickets"] or {}).get("path") == (str(tickets) if tickets else None)
        and all(run["data"].get(k) == v for k, v in data.items())
    )
    history = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return history if same and len(history) == cfg.epochs else None


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of b - a over paired runs (seeds), and its standard error."""
    diffs = [y - x for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"differences": diffs, "mean": statistics.mean(diffs), "standard_error": se}


def time_rounds(calls: dict, batch_sizes: list[int], img_size: int, rounds: int, warmup: int = 1) -> dict[tuple, list[float]]:
    """Seconds per call of every (key, batch) cell, one timing per round.

    `calls` maps keys whose first item is the engine ('torch' takes tensors, anything else numpy
    arrays) to a function of a batch of random images. Each round times every cell once, in a
    shuffled order, so machine noise hits every cell alike; a timing is the mean of enough calls
    to fill one batch of the largest size.
    """
    images = {b: torch.randn(b, 3, img_size, img_size) for b in batch_sizes}
    repeats = {b: max(1, max(batch_sizes) // b) for b in batch_sizes}

    def time_cell(key: tuple, batch: int) -> float:
        x = images[batch] if key[0] == "torch" else images[batch].numpy()
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(repeats[batch]):
                calls[key](x)
        return (time.perf_counter() - start) / repeats[batch]

    cells = [(key, b) for key in calls for b in batch_sizes]
    for cell in cells:
        for _ in range(warmup):
            time_cell(*cell)
    times: dict[tuple, list[float]] = {cell: [] for cell in cells}
    for r in range(rounds):
        random.shuffle(cells)
        for cell in cells:
            times[cell].append(time_cell(*cell))
        print(f"round {r + 1}/{rounds}", flush=True)
    return times
