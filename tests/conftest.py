from __future__ import annotations

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


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 12) -> Path:
    """An ImageFolder tree (train/ and test/) of small random PNGs and JPEGs."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
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
