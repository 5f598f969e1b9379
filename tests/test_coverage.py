"""Object coverage: which patches a box touches (exact on patch borders, scaled with the image),
the two shares, boxes files matched to a dataset, and the measure in tickets and exported graphs."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from typer.testing import CliRunner

from lotus import LotusError
from lotus.checkpoint import load_model, save_model
from lotus.coverage import (
    ImageBoxes,
    box_patches,
    coverage_shares,
    coverage_summary,
    keep_mask,
    match_boxes,
    read_boxes,
    selection_coverage,
    write_boxes,
)
from lotus.data import DataConfig, ImageData, load_split
from lotus.drop import num_keep
from lotus.export import ExportConfig, export_onnx, exported_coverage, exported_keep_idx, keep_idx_path
from lotus.runtime import read_metadata
from lotus.tickets import TicketConfig, load_tickets, tickets_from_checkpoint
from lotus.vit import build_model, cls_attention


def patches(box, size=(16, 16), grid=4, patch_size=4, min_cover=0.0) -> list[int]:
    """The patch indices one box touches."""
    on = box_patches(torch.tensor([box]), torch.tensor([size]), grid, patch_size, min_cover)[0]
    return on.nonzero().flatten().tolist()


@pytest.mark.parametrize(
    "box, expected",
    [
        ((0, 0, 3, 3), [0]),  # the first patch exactly: pixel 3 is its last
        ((0, 0, 4, 3), [0, 1]),  # pixel 4 is the second column's first
        ((4, 4, 7, 7), [5]),  # one patch, borders on all four sides
        ((3, 3, 4, 4), [0, 1, 4, 5]),  # a 2x2 box across the corner of four patches
        ((7, 0, 8, 0), [1, 2]),  # one row of pixels, across a column border
        ((15, 15, 15, 15), [15]),  # the last pixel
        ((0, 0, 15, 15), list(range(16))),  # the whole image
    ],
)
def test_a_box_touches_the_patches_it_shares_a_pixel_with(box, expected):
    assert patches(box) == expected


def test_touching_is_sharing_a_pixel_for_any_box_at_the_native_size():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, x1 = sorted(rng.integers(0, 16, 2))
        y0, y1 = sorted(rng.integers(0, 16, 2))
        pixels = torch.zeros(16, 16, dtype=torch.bool)
        pixels[y0 : y1 + 1, x0 : x1 + 1] = True
        expected = pixels.view(4, 4, 4, 4).any(-1).any(1).flatten()  # (row, y, col, x) -> any pixel per patch
        assert patches((x0, y0, x1, y1)) == expected.nonzero().flatten().tolist()


def test_the_box_is_scaled_with_its_image_to_the_input_size():
    # 32x32 -> 16: pixels 0..7 become input pixels 0..3, pixel 8 reaches into the second column
    assert patches((0, 0, 7, 7), size=(32, 32)) == [0]
    assert patches((0, 0, 8, 7), size=(32, 32)) == [0, 1]
    # 64 wide, 32 high -> 16x16: x scales by 1/4, y by 1/2
    assert patches((0, 0, 15, 7), size=(64, 32)) == [0]
    assert patches((16, 0, 63, 31), size=(64, 32)) == [c + 4 * r for r in range(4) for c in (1, 2, 3)]
    # one source pixel is a quarter of an input pixel: 15 ends exactly on the border, 16 starts on it
    assert patches((15, 0, 15, 0), size=(64, 64)) == [0]
    assert patches((16, 0, 16, 0), size=(64, 64)) == [1]
    # upscaled 12 -> 16: pixel 2 ends at 4 (the border), pixel 3 starts at 4 (past it)
    assert patches((0, 0, 2, 2), size=(12, 12)) == [0]
    assert patches((3, 3, 3, 3), size=(12, 12)) == [5]


def test_min_cover_counts_only_patches_the_box_covers_enough():
    # a box over the left half of patch 0 and the whole of patch 1
    assert patches((2, 0, 7, 3)) == [0, 1]
    assert patches((2, 0, 7, 3), min_cover=0.5) == [0, 1]
    assert patches((3, 0, 7, 3), min_cover=0.5) == [1]  # a quarter of patch 0


def test_the_two_shares_on_constructed_masks():
    keep = keep_mask(torch.tensor([[0, 1, 2, 3], [0, 5, 10, 15]]), 16)
    on_object = box_patches(torch.tensor([[3, 3, 4, 4], [0, 0, 15, 15]]), torch.tensor([[16, 16]] * 2), 4, 4)
    kept_on_object, object_kept = coverage_shares(keep, on_object)
    assert kept_on_object.tolist() == [0.5, 1.0]  # 2 of 4 kept on {0, 1, 4, 5}; the whole image is the object
    assert object_kept.tolist() == [0.5, 0.25]  # 2 of the object's 4; 4 of 16
    summary = coverage_summary(keep, on_object, without_box=3)
    assert summary == {
        "kept_on_object": 0.75,
        "object_kept": 0.375,
        "object_share": (4 / 16 + 1) / 2,
        "images": 2,
        "images_without_box": 3,
    }


def _boxes_for(root, split="train", skip=(), box=(0, 0, 2, 2)):
    files = sorted(p.relative_to(root).as_posix() for p in (root / split).rglob("*.*"))
    return write_boxes(root / "boxes.tsv", [(split, rel, box) for i, rel in enumerate(files) if i not in skip])


def test_boxes_are_matched_by_split_and_path(tmp_path):
    root = write_image_folder(tmp_path / "folder", size=12)
    _boxes_for(root, skip=(1,))
    data = load_split(DataConfig(str(root), img_size=16), "train")
    boxes = match_boxes(root / "boxes.tsv", data)
    assert boxes.index.tolist() == [0, 2, 3, 4, 5] and boxes.without_box == 1
    assert boxes.sizes.tolist() == [[12, 12]] * 5  # the files' own size, not the input's
    assert boxes.at_input(torch.tensor([1, 2]), 16)[1].tolist() == pytest.approx([0.0, 0.0, 4.0, 4.0])
    assert boxes.at_input(torch.tensor([1, 2]), 16)[0].isnan().all()  # no box
    with pytest.raises(LotusError, match=r"names none of the 6 test images of .*: pass the boxes file of this dataset"):
        match_boxes(root / "boxes.tsv", load_split(DataConfig(str(root)), "test"))
    cut = load_split(DataConfig(str(root), img_size=16, crop_pct=0.9), "test")  # boxes are of whole images
    with pytest.raises(LotusError, match=r"test images are cut as timm evaluates \(crop_pct 0.9\): measure a model trained"):
        match_boxes(root / "boxes.tsv", cut)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_boxes_are_in_the_upright_image_of_a_turned_photo(tmp_path, loader):
    """A phone photo stored 40 wide and 20 high with EXIF orientation 6 shows 20 wide and 40 high:
    its box is in the shown pixels, as LOTUS reads the image, and is scaled by the shown size."""
    from PIL import Image

    root = write_image_folder(tmp_path / "folder", size=12)
    stored = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    stored.save(root / "train" / "cat" / "000.jpg", exif=exif)
    write_boxes(root / "boxes.tsv", [("train", "train/cat/000.jpg", (0, 20, 19, 39))])  # the shown lower half
    data = load_split(DataConfig(str(root), img_size=16, loader=loader), "train")
    boxes = match_boxes(root / "boxes.tsv", data)
    assert boxes.sizes.tolist() == [[20, 40]]
    assert boxes.at_input(boxes.index, 16)[0].tolist() == pytest.approx([0.0, 8.0, 16.0, 16.0])


@pytest.mark.parametrize(
    "text, message",
    [
        ("train\ttrain/cat/000.jpg\t0\t0\t2\n", r"boxes.tsv:1: 5 tab-separated fields, not 6"),
        ("split\tpath\tx0\ty0\tx1\ty1\ntrain\ttrain/cat/000.jpg\t0\t0\t2\tx\n", r"boxes.tsv:2: the box '0 0 2 x' is not"),
        ("train\ttrain/cat/000.jpg\t5\t0\t2\t2\n", r"\(5, 0, 2, 2\) is not a box"),
        ("train\ttrain/cat/000.jpg\t0\t0\t12\t2\n", r"reaches outside its 12x12 image"),
    ],
)
def test_a_bad_boxes_file_is_one_clear_line(tmp_path, text, message):
    root = write_image_folder(tmp_path / "folder", size=12)
    (root / "boxes.tsv").write_text(text)
    with pytest.raises(LotusError, match=message):
        match_boxes(root / "boxes.tsv", load_split(DataConfig(str(root)), "train"))


def test_missing_boxes_or_data_without_files_are_refused(tmp_path):
    with pytest.raises(LotusError, match=r"boxes file .*nowhere.tsv not found: pass the dataset's boxes.tsv"):
        read_boxes(tmp_path / "nowhere.tsv")
    digits = ImageData(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["0"], "digits", "test")
    with pytest.raises(LotusError, match="--boxes needs an ImageFolder dataset"):
        match_boxes(tmp_path / "nowhere.tsv", digits)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--boxes", "nowhere.tsv"], "boxes file nowhere.tsv not found"),
        (["--data", "digits", "--boxes", "nowhere.tsv"], "--boxes needs an ImageFolder dataset"),
    ],
)
def test_tickets_refuse_bad_boxes_before_any_run_folder(tmp_path, monkeypatch, args, message):
    from cli.main import app

    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "folder")
    data = [] if "--data" in args else ["--data", "folder"]
    result = CliRunner().invoke(app, ["tickets", *data, *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def folder_run(tmp_path, tiny_cfg):
    """A tiny model for a two-class ImageFolder of 12x12 images, which it sees at 16x16 (4x4 patches)."""
    root = write_image_folder(tmp_path / "folder", size=12)
    cfg = replace(tiny_cfg, num_classes=2)
    pre = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["cat", "dog"]}
    save_model(tmp_path / "base", build_model(cfg).eval(), cfg, pre)
    return root, tmp_path / "base"


def test_tickets_json_records_the_object_coverage(folder_run, tmp_path):
    root, base = folder_run
    _boxes_for(root, skip=(5,))  # 12px box pixels 0..2 are input pixels 0..3: patch 0 alone
    data_cfg = DataConfig(str(root))
    cfg = TicketConfig(drop=0.5, boxes=str(root / "boxes.tsv"))
    tickets = tickets_from_checkpoint(base, data_cfg, cfg, tmp_path / "tk", device="cpu")
    coverage = json.loads((tmp_path / "tk" / "tickets.json").read_text())["object_coverage"]
    kept_first = (tickets.keep_idx[:5] == 0).any(-1).double()  # images 0..4 have the box
    assert coverage == {
        "kept_on_object": pytest.approx(float(kept_first.mean()) / 8),  # K = 8
        "object_kept": pytest.approx(float(kept_first.mean())),
        "object_share": 1 / 16,
        "images": 5,
        "images_without_box": 1,
    }
    assert (tmp_path / "tk" / "tickets.png").stat().st_size > 5_000
    # cut again at another drop: measured again with boxes, not carried over without
    recut = tickets_from_checkpoint(base, data_cfg, TicketConfig(drop=0.25), tmp_path / "tk2", scores_from=tmp_path / "tk")
    assert "object_coverage" not in load_tickets(tmp_path / "tk2").meta and recut.num_keep == 12
    whole = write_boxes(root / "whole.tsv", [("train", f, (0, 0, 11, 11)) for f in load_split(data_cfg, "train").files])
    cfg = TicketConfig(drop=0.25, boxes=str(whole))
    tickets_from_checkpoint(base, data_cfg, cfg, tmp_path / "tk3", scores_from=tmp_path / "tk")
    coverage = load_tickets(tmp_path / "tk3").meta["object_coverage"]
    assert (coverage["kept_on_object"], coverage["object_kept"], coverage["images"]) == (1.0, 12 / 16, 6)


@torch.no_grad()
def test_the_exported_graph_keeps_the_patches_its_select_block_attends(tiny_onnx):
    model, _ = load_model(tiny_onnx.parent / "run")
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    kept = exported_keep_idx(tiny_onnx, images, 0.5)
    assert kept.shape == (5, num_keep(16, 0.5))
    # what forward_dropping keeps in PyTorch: the top K of the select block's class-token attention
    x = model.norm_pre(model._pos_embed(model.patch_embed((images.float() / 255 - 0.3) / 0.4)))  # the fixture's mean, std
    select_block = int(read_metadata(tiny_onnx)["select_block"])
    for blk in model.blocks[:select_block]:
        x = blk(x)
    chooser = model.blocks[select_block]
    scores = cls_attention(chooser.attn, chooser.attn.qkv(chooser.norm1(x))).mean(1)[:, 1:]  # (B, N)
    assert torch.equal(kept.sort(-1).values, scores.topk(8, dim=1).indices.sort(-1).values)
    with pytest.raises(LotusError, match="has 0 TopK nodes"):
        exported_keep_idx(keep_idx_path(tiny_onnx), images, 0.5)


def test_exported_coverage_measures_what_the_graph_keeps(tiny_onnx):
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    boxes = ImageBoxes(
        torch.arange(4), torch.tensor([[0, 0, 3, 3], [0, 0, 3, 3], [0, 0, 15, 15], [4, 4, 11, 11]]), torch.full((4, 2), 16), 0
    )
    coverage = exported_coverage(tiny_onnx, images, boxes, 0.25)
    kept = exported_keep_idx(tiny_onnx, images, 0.25)
    assert coverage == selection_coverage(kept, boxes, 4, 4)
    kept_on_object, object_kept = coverage_shares(keep_mask(kept, 16), box_patches(boxes.boxes, boxes.sizes, 4, 4))
    assert kept_on_object[2] == 1.0 and object_kept[2] == 12 / 16  # the whole image is the object


@pytest.mark.slow
def test_export_reports_the_object_coverage_of_its_graph(folder_run, tmp_path):
    root, base = folder_run
    _boxes_for(root, split="test", box=(0, 0, 11, 11))  # the whole image
    cfg = ExportConfig(boxes=str(root / "boxes.tsv"))
    report = export_onnx(base, tmp_path / "model.onnx", DataConfig(str(root)), cfg)
    assert set(report["object_coverage"]) == {"0.1", "0.3", "0.5"}
    for drop, coverage in report["object_coverage"].items():
        assert (coverage["kept_on_object"], coverage["object_kept"]) == (1.0, num_keep(16, float(drop)) / 16)
        assert (coverage["images"], coverage["images_without_box"]) == (6, 0)
    with pytest.raises(LotusError, match="names none of the 6 test images"):
        export_onnx(base, tmp_path / "other.onnx", DataConfig(str(root)), ExportConfig(boxes=str(_boxes_for(root))))
    assert not (tmp_path / "other.onnx").exists()
