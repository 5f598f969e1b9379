from __future__ import annotations

import os

# huggingface_hub reads this once, when timm first imports it: set it before any import below,
# so a test that asks for hub weights fails at once, as it does for a user with no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lotus.vit import ModelConfig


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    # No hub is reachable from CI: fail at once instead of retrying, as a user with no network would.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """A two-block ViT-Tiny on 16x16 images with 4x4 patches (16 patch tokens)."""
    return ModelConfig(num_classes=10, img_size=16, patch_size=4, depth=2, drop_path_rate=0.0)


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 12, splits=("train", "test")) -> Path:
    """An ImageFolder tree (train/ and test/, or `splits`) of small random PNGs and JPEGs."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(root / split / c / f"{i:03d}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "folder")


# --- The inference service (tests/test_serve*.py) ---------------------------------------------


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """An exported LOTUS model: a 2-block ViT on 16x16 images (16 patches of 4x4), 10 classes,
    the digits preprocessing (mean 0.3, std 0.4). Unverified: the export tests cover that."""
    from lotus.checkpoint import save_model
    from lotus.export import ExportConfig, export_onnx
    from lotus.vit import build_model

    root = tmp_path_factory.mktemp("served")
    cfg = ModelConfig(num_classes=10, img_size=16, patch_size=4, depth=2, drop_path_rate=0.0)
    torch.manual_seed(0)
    pre = {"img_size": 16, "mean": [0.3] * 3, "std": [0.4] * 3, "classes": [f"class{i}" for i in range(10)], "dataset": "digits"}
    save_model(root / "run", build_model(cfg).eval(), cfg, pre, None, sparsity={"overall": 0.0})
    export_onnx(root / "run", root / "model.onnx", None, ExportConfig(verify=False))
    return root / "model.onnx"


def live_server(settings, app=None):
    """A real uvicorn serving `app` (default: `create_app(settings)`) on a free loopback port, in
    a thread, with the HTTP limits `lotus serve` sets.

    A context manager yielding the base URL once /v2/health/ready answers 200.
    """
    import contextlib
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from serve.app import create_app
    from serve.http import server_options

    @contextlib.contextmanager
    def running():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(
            uvicorn.Config(
                app or create_app(settings), log_config=None, log_level="info", access_log=False, **server_options(settings)
            )
        )
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the server at {url} did not become ready")
                time.sleep(0.05)
            yield url
        finally:
            server.should_exit = True
            thread.join(15)
            sock.close()

    return running()
