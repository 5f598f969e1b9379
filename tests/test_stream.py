"""Streaming a split from its files: the same batches as in memory, reproducible augmentation,
the automatic choice, unreadable images and dead workers, and tickets that follow the content
through timm's RandomResizedCrop."""

import os

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

import lotus.data
from lotus import LotusError
from lotus.data import DataConfig, ImageData, load_split, make_loader
from lotus.stream import StreamLoader
from lotus.tickets import Tickets, crop_scores, keep_from_scores

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _batches(loader, epoch=0):
    return list(loader.epoch(epoch))


def test_a_streamed_split_gives_the_batches_memory_gives(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=7, size=20)
    memory = load_split(DataConfig(str(root), img_size=16, loader="memory"), "train")
    streamed = load_split(DataConfig(str(root), img_size=16, loader="stream"), "train")
    assert streamed.streamed and streamed.images is None and not memory.streamed
    assert torch.equal(streamed.labels, memory.labels) and streamed.files == memory.files
    kwargs = dict(shuffle=True, seed=3)
    expected = _batches(make_loader(memory, 4, MEAN, STD, **kwargs))
    for workers in (0, 2):
        got = _batches(make_loader(streamed, 4, MEAN, STD, workers=workers, **kwargs))
        assert isinstance(make_loader(streamed, 4, MEAN, STD), StreamLoader)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
            assert torch.allclose(a.images, b.images, atol=1e-5)  # decoded as memory decodes them
    assert torch.equal(streamed.take(torch.tensor([5, 1])).images, memory.images[[5, 1]])


def test_augmentation_depends_on_seed_epoch_and_index_not_on_the_workers(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=6, size=24)
    data = load_split(DataConfig(str(root), img_size=16, loader="stream", val_fraction=0), "train")
    runs = {w: _batches(make_loader(data, 5, MEAN, STD, augment="rrc", shuffle=True, workers=w)) for w in (0, 1, 2)}
    for w in (1, 2):
        for a, b in zip(runs[0], runs[w]):
            assert torch.equal(a.images, b.images) and torch.equal(a.crop, b.crop) and torch.equal(a.flip, b.flip)
    first = runs[0][0]
    assert first.crop.shape == (5, 4) and first.shift is None
    assert (first.crop[:, 2:] > 0).all() and (first.crop[:, :2] + first.crop[:, 2:] <= 1).all()  # inside the image
    later = _batches(make_loader(data, 5, MEAN, STD, augment="rrc", shuffle=True, workers=0), epoch=1)
    assert not torch.equal(later[0].crop, first.crop)  # each epoch draws afresh
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    _batches(make_loader(data, 5, MEAN, STD, augment="randaug", workers=0))
    assert torch.equal(torch.rand(1), before)  # in-process loading leaves the training process's generators alone


def test_the_padded_crop_streams_too_and_reports_its_shift(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=4, size=16)
    data = load_split(DataConfig(str(root), img_size=16, loader="stream", val_fraction=0), "train")
    batch = _batches(make_loader(data, 8, MEAN, STD, augment="crop", workers=0, seed=1))[0]
    assert batch.shift.shape == (8, 2) and batch.crop is None and (batch.shift.abs() <= 4).all() and (batch.shift != 0).any()
    plain = load_split(DataConfig(str(root), img_size=16, loader="memory", val_fraction=0), "train")
    i, (dy, dx) = 0, batch.shift[0].tolist()
    pixels = (batch.images[i] * torch.tensor(STD).view(3, 1, 1) * 255 + torch.tensor(MEAN).view(3, 1, 1) * 255).round()
    source = plain.images[int(batch.index[i])].float()
    if batch.flip[i]:
        pixels = pixels.flip(-1)
    inside = pixels[:, max(dy, 0) : 16 + min(dy, 0), max(dx, 0) : 16 + min(dx, 0)]
    assert torch.allclose(inside, source[:, max(-dy, 0) : 16 + min(-dy, 0), max(-dx, 0) : 16 + min(-dx, 0)], atol=1)


def test_auto_streams_only_a_split_over_the_memory_budget(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "f", per_class=5, size=16)
    cfg = DataConfig(str(root), img_size=16, val_fraction=0.1)
    size = lotus.data.decoded_bytes(9, 16)  # the training split: 10 images less the one held out
    monkeypatch.setattr(lotus.data, "memory_budget", lambda: size)
    assert not load_split(cfg, "train").streamed
    monkeypatch.setattr(lotus.data, "memory_budget", lambda: size - 1)
    assert load_split(cfg, "train").streamed
    assert not load_split(DataConfig(str(root), img_size=16, loader="memory"), "train").streamed  # the override
    with pytest.raises(LotusError, match="--loader 'disk' is not one of"):
        DataConfig(str(root), loader="disk")


def test_an_unreadable_image_is_named_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=4, size=16)
    bad = root / "train" / "cat" / "001.png"
    bad.write_bytes(b"not an image at all")
    data = load_split(DataConfig(str(root), img_size=16, loader="stream", val_fraction=0), "train")
    lines = []
    loader = StreamLoader(data, 3, MEAN, STD, workers=1, log=lines.append)
    batches = _batches(loader)
    assert sum(len(b.labels) for b in batches) == 7 and loader.skipped == 1
    assert len(lines) == 1 and "train/cat/001.png" in lines[0]
    with pytest.raises(LotusError, match="cannot read image .*001.png"):  # in memory a bad file stops the load
        load_split(DataConfig(str(root), img_size=16, loader="memory", val_fraction=0), "train")


# the killed worker's DataLoader iterator may report the death once more when it is collected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_dead_worker_is_one_line_not_a_hang(tmp_path, monkeypatch):
    import lotus.stream

    root = write_image_folder(tmp_path / "f", per_class=4, size=16)
    data = load_split(DataConfig(str(root), img_size=16, loader="stream", val_fraction=0), "train")
    real = lotus.stream.Samples._image
    monkeypatch.setattr(lotus.stream.Samples, "_image", lambda self, i: os._exit(9) if i == 5 else real(self, i))
    with pytest.raises(LotusError, match="a data loader worker stopped .*--resume"):
        _batches(StreamLoader(data, 2, MEAN, STD, workers=1))


@pytest.mark.parametrize("death, said", [(EOFError(), "EOFError"), (ConnectionResetError("reset by peer"), "reset by peer")])
def test_a_worker_dying_mid_transfer_is_the_same_one_line(tmp_path, monkeypatch, death, said):
    """Which error a death raises depends on when it happens: while a batch is in transit the
    connection closes (EOFError) or resets before torch notices; the race cannot be forced, so the
    loader raises what it would."""
    import lotus.stream

    class DyingLoader:
        def __init__(self, *args, **kwargs):
            pass

        def __iter__(self):
            raise death

    root = write_image_folder(tmp_path / "f", per_class=4, size=16)
    data = load_split(DataConfig(str(root), img_size=16, loader="stream", val_fraction=0), "train")
    monkeypatch.setattr(lotus.stream, "DataLoader", DyingLoader)
    with pytest.raises(LotusError, match=rf"a data loader worker stopped \({said}\): .*--resume"):
        _batches(StreamLoader(data, 2, MEAN, STD, workers=1))


def test_channel_stats_in_chunks_match_the_whole_split():
    images = torch.randint(0, 256, (300, 3, 20, 20), dtype=torch.uint8)
    data = ImageData(images, torch.zeros(300, dtype=torch.long), ["a"], "x", "train")
    x = images.double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = data.channel_stats()
    assert np.allclose(mean, x.mean(1).tolist(), atol=1e-6) and np.allclose(std, x.std(1).tolist(), atol=1e-6)


def test_crop_scores_resample_the_map_to_the_crop_and_flip_it():
    scores = torch.arange(16.0).view(1, 16)
    whole = crop_scores(scores, 4, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([False]))
    assert torch.allclose(whole, scores)  # the whole image: the map itself
    flipped = crop_scores(scores, 4, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([True]))
    assert torch.allclose(flipped.view(4, 4), scores.view(4, 4).flip(-1))
    quarter = crop_scores(scores, 4, torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([False])).view(4, 4)
    # crop centres at rows/columns 1.75, 2.25, 2.75, 3.25 of the map (3.25: past the last centre, the border)
    assert quarter[:, -1].allclose(torch.tensor([4 * 1.75 + 3, 4 * 2.25 + 3, 4 * 2.75 + 3, 15.0]))
    assert quarter[0].allclose(torch.tensor([4 * 1.75 + 1.75, 4 * 1.75 + 2.25, 4 * 1.75 + 2.75, 4 * 1.75 + 3]))


def test_kept_patches_follow_the_object_through_random_resized_crops(tmp_path):
    """One bright object per photo-like image (a 16x16 block of a 64x48 picture, off the square), scored
    highest by its ticket; after timm's RandomResizedCrop and flip, as the streaming loader applies
    them, the patches kept must hold the object wherever the crop put it, far beyond chance."""
    rng = np.random.default_rng(0)
    grid, patch, n = 4, 8, 48  # the model sees 32x32: a 4x4 grid of 8 px patches
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a").mkdir(parents=True)
    where = []
    for i in range(n):
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        r, c = rng.integers(0, 3), rng.integers(0, 4)  # the object on a 3x4 grid of 16 px cells
        pixels[16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] = 255
        Image.fromarray(pixels).save(tmp_path / "train" / "a" / f"{i:03d}.png")
        where.append((r, c))
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(tmp_path / "test" / "a" / "0.png")
    data = load_split(DataConfig(str(tmp_path), img_size=32, loader="stream", val_fraction=0), "train")
    # The ticket's score map covers the whole picture squashed to 32x32: the object's cells, by area.
    maps = torch.zeros(n, 48, 64)
    for i, (r, c) in enumerate(where):
        maps[i, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] = 1
    scores = torch.nn.functional.adaptive_avg_pool2d(maps[:, None], grid).view(n, -1)
    k = 8  # drop 0.5
    tickets = Tickets(keep_from_scores(scores, k), scores, grid, patch, {"config": {"select": "attention"}})
    covered, unmoved, random_cover, seen = 0.0, 0.0, 0.0, 0
    for epoch in range(4):
        for batch in make_loader(data, 16, [0, 0, 0], [1, 1, 1], augment="rrc", shuffle=True, workers=0, seed=epoch).epoch(epoch):
            bright = (batch.images[:, 0] > 0.5).float().view(-1, grid, patch, grid, patch).sum((2, 4)).view(-1, grid * grid)
            keep = tickets.for_batch(batch)
            for i in range(len(bright)):
                if bright[i].sum() < patch * patch:  # the crop left less than a patch of the object
                    continue
                on_object = bright[i] / bright[i].sum()  # share of the visible object in each patch
                covered += float(on_object[keep[i]].sum())
                unmoved += float(on_object[tickets.keep_idx[batch.index[i]]].sum())
                random_cover += float(on_object[torch.randperm(grid * grid)[:k]].sum())
                seen += 1
    assert seen > 50
    assert covered / seen > 0.9  # the kept half holds almost all of the object...
    assert covered / seen > unmoved / seen + 0.2  # ...which the ticket left where it was does not
    assert abs(random_cover / seen - 0.5) < 0.1  # random drop keeps about half of it


@pytest.mark.slow
def test_a_streamed_folder_trains_scores_and_trains_on_its_tickets(tmp_path):
    """`lotus train` and `lotus tickets` on a streamed folder, then training on the tickets under
    RandomResizedCrop: each run says how its data is held; tickets fit the folder either way."""
    import json

    from test_cli import FAST, lotus

    root = write_image_folder(tmp_path / "f", per_class=12, size=40)
    data = ["--data", root, "--img-size", "32", "--workers", "1"]
    proc = lotus("train", *data, "--loader", "stream", "--epochs", "1", *FAST, "--out", tmp_path / "base")
    said = lambda proc: " ".join(proc.stderr.split())  # noqa: E731  (rich wraps its lines)
    assert "streamed from its files by 1 loader workers; augmentation rrc" in said(proc)
    lotus(
        "tickets",
        "--checkpoint",
        tmp_path / "base",
        "--data",
        root,
        "--loader",
        "stream",
        "--drop",
        "0.5",
        "--out",
        tmp_path / "t",
    )
    lottery = ["train", *data, "--epochs", "2", *FAST, "--tickets", tmp_path / "t", "--checkpoint", tmp_path / "base"]
    proc = lotus(*lottery, "--loader", "stream", "--aug", "randaug", "--out", tmp_path / "lottery")
    assert "augmentation randaug without geometric RandAugment ops" in said(proc)
    rows = [json.loads(line) for line in (tmp_path / "lottery" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in rows] == [0, 0]
    proc = lotus(*lottery, "--loader", "memory", "--out", tmp_path / "in-memory")  # the same files, decoded
    assert "held in memory; augmentation crop" in said(proc)
