"""The dataset as users bring it (an ImageFolder root like Tiny-ImageNet's): greyscale and CMYK
JPEGs load as RGB, files beside the splits and stray files inside them are ignored, and the words
of a classes.tsv at the root are the class names people see (in the checkpoint, the ONNX
metadata, /v1/classify and the report), while the folder names stay the classes' identity."""

from __future__ import annotations

import io
import json
import re

import httpx
import numpy as np
import onnx
import pytest
from conftest import live_server, write_image_folder
from PIL import Image

from lotus import LotusError
from lotus.checkpoint import read_sidecar
from lotus.config import class_labels, class_names
from lotus.data import DataConfig, load_split
from lotus.export import ExportConfig, export_onnx
from lotus.pipeline import default_compress_config
from lotus.report import build_metrics, render_report
from lotus.runtime import read_metadata
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig
from serve.model import ServedModel
from serve.settings import Settings

WNIDS = ["n01443537", "n02123045", "n02124075"]  # sorted: the label order
WORDS = "n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\nn02123045\ttabby, tabby cat\n"
LABELS = ["goldfish", "tabby", "Egyptian cat"]  # each folder's first synonym, in label order


def tiny_imagenet(root, words: str | None = WORDS):
    """A Tiny-ImageNet-like root: wnid class folders, classes.tsv (with a class the data lacks),
    boxes.tsv and a README beside the splits."""
    write_image_folder(root, WNIDS, per_class=2, size=16)
    if words is not None:
        (root / "classes.tsv").write_text(words + "n09999999\tnot in this data\n")
    (root / "boxes.tsv").write_text("train\ttrain/n01443537/000.jpg\t0\t0\t15\t15\n")
    (root / "README.md").write_text("# my data\n")
    return root


def test_greyscale_and_cmyk_jpegs_load_as_rgb(tmp_path):
    root = write_image_folder(tmp_path / "data", ("cat", "dog"), per_class=3, size=12)
    grey = np.random.default_rng(1).integers(0, 256, (12, 12), dtype=np.uint8)
    Image.fromarray(grey, "L").save(root / "train" / "cat" / "003.jpg")
    Image.new("RGB", (12, 12), (200, 40, 90)).convert("CMYK").save(root / "train" / "cat" / "004.jpg")
    data = load_split(DataConfig(str(root)), "train")
    assert data.images.shape == (8, 3, 12, 12) and data.labels.tolist() == [0] * 5 + [1] * 3
    decoded_grey = np.asarray(Image.open(root / "train" / "cat" / "003.jpg"))  # mode L: what the JPEG holds
    for channel in data.images[3]:  # the three channels are the grey picture
        assert np.array_equal(channel.numpy(), decoded_grey)
    cmyk = data.images[4].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(cmyk - np.array([200, 40, 90])).max() <= 8  # the colour, up to JPEG's rounding


def test_files_beside_and_inside_the_splits_are_ignored(tmp_path):
    root = tiny_imagenet(tmp_path / "data")
    (root / "train" / "notes.txt").write_text("stray")
    (root / "train" / ".DS_Store").write_bytes(b"\0\1")
    Image.new("RGB", (16, 16)).save(root / "test" / "loose.jpg")  # an image outside any class folder
    (root / "train" / WNIDS[0] / f"{WNIDS[0]}_boxes.txt").write_text("000.jpg\t0\t0\t15\t15\n")
    (root / "train" / WNIDS[0] / "._000.jpg").write_bytes(b"\0\5\26\7 macOS resource fork")
    cfg = DataConfig(str(root))
    assert class_names(cfg) == WNIDS
    for split in ("train", "test"):
        data = load_split(cfg, split)
        assert data.classes == WNIDS and len(data) == 6
        assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_class_words_are_the_labels_and_folders_the_classes(tmp_path):
    root = tiny_imagenet(tmp_path / "data")
    data = load_split(DataConfig(str(root)), "test")
    assert data.classes == WNIDS and data.class_labels == LABELS
    plain = load_split(DataConfig(str(tiny_imagenet(tmp_path / "plain", words=None))), "test")
    assert plain.class_labels == plain.classes == WNIDS  # no classes.tsv: the folder names


@pytest.mark.parametrize(
    "words, message",
    [
        ("n01443537\tgoldfish\nn02124075\tEgyptian cat\n", "has no line for the class folder n02123045: add a line"),
        (WORDS + "n02124075 Egyptian cat\n", "line 4 ('n02124075 Egyptian cat') has no tab after a folder name"),
        (WORDS.replace("\tEgyptian cat", "\t  "), "line 2 gives no words for n02124075"),
    ],
)
def test_a_malformed_classes_tsv_is_one_line(tmp_path, monkeypatch, words, message):
    root = tiny_imagenet(tmp_path / "data", words)
    with pytest.raises(LotusError, match=re.escape(message)) as info:
        load_split(DataConfig(str(root)), "train")
    assert "\n" not in str(info.value)
    with pytest.raises(LotusError, match="classes.tsv"):
        class_labels(DataConfig(str(root)), class_names(DataConfig(str(root))))

    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--epochs", "1"])
    assert result.exit_code == 2 and "classes.tsv" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model trained one epoch on the Tiny-ImageNet-like root, and its export."""
    tmp = tmp_path_factory.mktemp("words")
    root = tiny_imagenet(tmp / "data")
    model = ModelConfig(img_size=16, patch_size=4, depth=1, drop_path_rate=0.0)
    train(
        DataConfig(str(root)),
        model,
        TrainConfig(epochs=1, batch_size=6, warmup_epochs=0.0, device="cpu"),
        tmp / "run",
        log=lambda _: None,
    )
    export_onnx(tmp / "run", tmp / "model.onnx", DataConfig(str(root)), ExportConfig(verify=False))
    return tmp


def test_words_reach_the_checkpoint_and_the_onnx_metadata(exported):
    pre = read_sidecar(exported / "run")["preprocess"]
    assert pre["classes"] == WNIDS and pre["labels"] == LABELS
    meta = read_metadata(exported / "model.onnx")
    assert json.loads(meta["classes"]) == WNIDS and json.loads(meta["labels"]) == LABELS


def test_classify_answers_the_class_words(exported):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    settings = Settings(model=exported / "model.onnx", api_key=None)
    with live_server(settings) as url:
        data = httpx.post(url + "/v1/classify", params={"top_k": 3}, files={"file": ("p.png", _png(photo), "image/png")})
        meta = httpx.get(url + "/v2/models/lotus").json()
    assert data.status_code == 200, data.text
    labels = {p["index"]: p["label"] for p in data.json()["predictions"]}
    assert labels == dict(enumerate(LABELS))  # every class answered by its words, at its logit's index
    assert meta["outputs"][0]["shape"] == [-1, 3] and "Egyptian cat" in meta["parameters"]["labels"]


def test_an_export_without_labels_serves_its_class_names(exported, tmp_path):
    """Models exported before labels were recorded answer with their class names; labels that do
    not fit the classes are refused at load."""
    old = tmp_path / "old.onnx"
    proto = onnx.load(str(exported / "model.onnx"))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "labels"]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(old))
    assert ServedModel.load(old).labels == WNIDS
    proto.metadata_props.add(key="labels", value=json.dumps(["one", "two"]))
    onnx.save(proto, str(old))
    with pytest.raises(LotusError, match="2 labels for 3 classes"):
        ServedModel.load(old)


def test_the_report_names_the_classes_by_their_words():
    cfg = default_compress_config("digits")
    done = {
        "baseline": {"accuracy": 90.0},
        "tickets": {"num_keep": 14, "num_patches": 16, "outlier_patches": 0},
        "prune": {"accuracy": 89.0, "sparsity": 0.3},
        "evaluate": {"accuracy": 91.0, "sparsity": 0.3, "labels": [f"word {i}" for i in range(12)]},
    }
    text = render_report(cfg, done, build_metrics(cfg, done))
    assert "Classes (12): word 0, word 1, word 2, word 3, word 4, word 5, word 6, word 7, word 8, word 9, ... (2 more)." in text
    del done["evaluate"]["labels"]  # a run recorded before the labels were
    assert "Classes" not in render_report(cfg, done, build_metrics(cfg, done))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
