"""Datasets, the validation hold-out, batches with sample indices, augmentation, and the errors bad data gives."""

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from lotus import LotusError
from lotus.data import AugmentConfig, BatchLoader, DataConfig, augment_batch, holdout_positions, load_split


def test_digits_is_the_offline_default():
    train, test = load_split(DataConfig(val_fraction=0), "train"), load_split(DataConfig(), "test")
    assert (len(train), len(test)) == (1437, 360)  # the whole stored training split, nothing held out
    assert train.images.shape[1:] == (3, 8, 8) and train.images.dtype == torch.uint8
    assert train.classes == [str(i) for i in range(10)]
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert load_split(DataConfig(img_size=16), "test").images.shape[1:] == (3, 16, 16)


def test_validation_is_held_out_of_train_stratified_and_fixed():
    train, val = load_split(DataConfig(), "train"), load_split(DataConfig(), "val")
    assert (len(train), len(val)) == (1437 - 72, 72)  # 5% of the 1,437 training images
    assert not set(train.positions.tolist()) & set(val.positions.tolist())  # no image serves both
    assert sorted(train.positions.tolist() + val.positions.tolist()) == list(range(1437))
    whole = load_split(DataConfig(val_fraction=0), "train")
    assert len(whole) == 1437 and whole.positions is None
    assert torch.equal(val.images, whole.images[val.positions]) and torch.equal(train.labels, whole.labels[train.positions])
    per_class = torch.bincount(whole.labels)
    assert (torch.bincount(val.labels) - 0.05 * per_class).abs().max() < 1  # every class its share, rounded
    again = load_split(DataConfig(img_size=16), "val")  # the same images at any size, on any load
    assert torch.equal(again.positions, val.positions) and again.split == "val"
    with pytest.raises(LotusError, match="--val-fraction 0 leaves no validation split"):
        load_split(DataConfig(val_fraction=0), "val")
    with pytest.raises(LotusError, match="--val-fraction 0.9 is outside"):
        DataConfig(val_fraction=0.9)


def test_holdout_shares_rounding_among_classes_and_keeps_one_of_each():
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 1 + [3] * 22)
    held = holdout_positions(labels, 0.1)
    assert len(held) == round(0.1 * 80) and torch.equal(held, held.sort().values)
    assert torch.bincount(labels[held], minlength=4).tolist() == [5, 1, 0, 2]  # 5, 0.7, 0.1, 2.2: 8 in all
    assert torch.equal(held, holdout_positions(labels, 0.1))  # a fixed seed
    assert not torch.equal(held, holdout_positions(labels, 0.1, seed=1))
    lone = torch.tensor([0, 1, 1])  # class 0's quota rounds up to its only image, which stays in train
    assert lone[holdout_positions(lone, 0.5)].tolist() == [1]


def test_an_image_folder_holds_out_of_train_and_decodes_only_what_a_split_takes(tmp_path, monkeypatch):
    import lotus.data

    root = write_image_folder(tmp_path / "f", per_class=20)
    decoded = []
    real = lotus.data._decode
    monkeypatch.setattr(lotus.data, "_decode", lambda path, size, crop=None: decoded.append(path) or real(path, size, crop))
    val = load_split(DataConfig(str(root), val_fraction=0.1), "val")
    assert len(val) == 4 and len(decoded) == 4 and all("/train/" in str(p) for p in decoded)
    assert torch.bincount(val.labels).tolist() == [2, 2]
    train = load_split(DataConfig(str(root), val_fraction=0.1), "train")
    assert len(train) == 36 and not set(train.positions.tolist()) & set(val.positions.tolist())


def test_an_image_folder_val_folder_is_the_validation_split(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=4, splits=("train", "val", "test"))
    val, train = load_split(DataConfig(str(root)), "val"), load_split(DataConfig(str(root)), "train")
    assert (len(val), len(train)) == (8, 8) and train.positions is None  # nothing held out of train/
    assert load_split(DataConfig(str(root), val_fraction=0), "val").positions is None  # val/ needs no hold-out
    only_val = write_image_folder(tmp_path / "g", per_class=40, splits=("train", "val"))
    assert len(load_split(DataConfig(str(only_val)), "test")) == 80  # without test/, val/ is the test split...
    assert len(load_split(DataConfig(str(only_val)), "val")) == 4  # ...and validation is held out of train/


def test_batches_carry_the_index_of_each_sample():
    data = load_split(DataConfig(), "test")
    mean, std = data.channel_stats()
    loader = BatchLoader(data, 64, mean, std, shuffle=True, seed=3)
    seen = []
    for batch in loader.epoch(0):
        seen += batch.index.tolist()
        # each image is the normalised sample its index names
        expected = (data.images[batch.index].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
            1, 3, 1, 1
        )
        assert torch.allclose(batch.images, expected, atol=1e-5)
        assert torch.equal(batch.labels, data.labels[batch.index])
    assert sorted(seen) == list(range(len(data)))  # every sample exactly once per epoch
    first = [b.index for b in loader.epoch(1)]
    again = [b.index for b in loader.epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # epoch order is a function of (seed, epoch)
    assert not torch.equal(first[0], next(loader.epoch(0)).index)


def test_augmentation_reports_the_shift_and_flip_it_applied():
    images = torch.randint(1, 255, (16, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding shows as 0
    out, shift, flip = augment_batch(images, AugmentConfig(padding=2, hflip=True), torch.Generator().manual_seed(0))
    assert out.shape == images.shape and shift.abs().max() <= 2
    for img, aug, (dy, dx), flipped in zip(images, out, shift.tolist(), flip.tolist()):
        aug = aug.flip(-1) if flipped else aug
        # content moved by (dy, dx): aug[y + dy, x + dx] == img[y, x] wherever both are inside
        ys, xs = slice(max(0, -dy), 8 - max(0, dy)), slice(max(0, -dx), 8 - max(0, dx))
        yd, xd = slice(max(0, dy), 8 + min(0, dy)), slice(max(0, dx), 8 + min(0, dx))
        assert torch.equal(aug[:, yd, xd], img[:, ys, xs])
    assert flip.any() and not flip.all() and (shift != 0).any()


def test_image_folder_loads_with_sorted_classes(image_folder):
    train = load_split(DataConfig(str(image_folder)), "train")
    assert train.classes == ["cat", "dog"] and len(train) == 6
    assert train.images.shape == (6, 3, 12, 12)
    assert load_split(DataConfig(str(image_folder), img_size=16), "test").images.shape == (6, 3, 16, 16)


def test_val_folder_serves_as_test_split(image_folder):
    (image_folder / "test").rename(image_folder / "val")
    assert len(load_split(DataConfig(str(image_folder)), "test")) == 6


def test_corrupt_image_is_named(image_folder):
    bad = image_folder / "train" / "dog" / "002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(LotusError, match=f"cannot read image {bad}"):
        load_split(DataConfig(str(image_folder)), "train")


def test_empty_class_folder_is_named(image_folder):
    (image_folder / "train" / "bird").mkdir()
    with pytest.raises(LotusError, match="train/bird holds no images"):
        load_split(DataConfig(str(image_folder)), "train")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: (root / "test").rename(root / "elsewhere"), "has no test/ or val/ folder"),
        (lambda root: (root / "test" / "cat").rename(root / "test" / "lion"), "differ from those of"),
    ],
)
def test_wrong_layout_is_explained(image_folder, breakage, message):
    breakage(image_folder)
    with pytest.raises(LotusError, match=message):
        load_split(DataConfig(str(image_folder)), "test")


def test_missing_cifar10_says_how_to_get_it(tmp_path):
    with pytest.raises(LotusError, match="CIFAR-10 not found .*--download"):
        load_split(DataConfig("cifar10", data_dir=str(tmp_path)), "train")


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(LotusError, match="neither 'digits', 'cifar10' nor a folder"):
        load_split(DataConfig(str(tmp_path / "nothing")), "train")


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_crop_pct_cuts_evaluation_images_as_timm_evaluates_and_leaves_training_images_whole(tmp_path, loader):
    """Photographs of any shape: validation and test images are resized and centre-cut exactly as
    timm's evaluation transform does (in memory and through the loader workers alike), while the
    training split stays whole, so tickets and augmentation see the whole image."""
    from PIL import Image
    from timm.data import create_transform

    from lotus.data import make_loader
    from lotus.images import square_rgb

    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate([(40, 24), (24, 44), (30, 30)]):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    cfg = DataConfig(str(root), img_size=16, val_fraction=0.34, loader=loader, crop_pct=0.875)
    resize, centre = create_transform(16, is_training=False, crop_pct=0.875, interpolation="bilinear").transforms[:2]
    for split in ("val", "test"):
        data = load_split(cfg, split)
        assert data.crop_pct == 0.875
        pixels = next(make_loader(data, len(data), [0.0] * 3, [1.0] * 3, workers=0).epoch()).images * 255
        for n, path in enumerate(data.paths(range(len(data)))):
            with Image.open(path) as im:
                expected = torch.from_numpy(np.array(centre(resize(im.convert("RGB"))))).permute(2, 0, 1)
            assert torch.allclose(pixels[n], expected.float(), atol=1e-3), (split, path.name)
    train = load_split(cfg, "train")
    assert train.crop_pct is None
    pixels = next(make_loader(train, len(train), [0.0] * 3, [1.0] * 3, workers=0).epoch()).images * 255
    with Image.open(train.paths([0])[0]) as im:
        assert torch.allclose(pixels[0], torch.from_numpy(square_rgb(im, 16).copy()).permute(2, 0, 1).float(), atol=1e-3)
    digits = load_split(DataConfig(img_size=16, crop_pct=0.875), "test")  # built-ins alike: 8 px, to 18, centre 16
    whole = load_split(DataConfig(img_size=16), "test")
    assert digits.images.shape == whole.images.shape and not torch.equal(digits.images, whole.images)
    with pytest.raises(LotusError, match="--crop-pct 0.3 is outside"):
        DataConfig(crop_pct=0.3)
