"""Every stage's settings: one frozen dataclass per stage, each refusing bad fields when built.

Without torch (timm is imported only to look a model name up), so a command checks its settings
in milliseconds, before it loads torch or makes a run folder. The stage modules re-export their
configs (`from lotus.train import TrainConfig` still works). Here too are the small pure rules
those checks need: device strings, N:M patterns, patch sizes, ticket layers, and where a
dataset's classes are and what people call them (found without decoding an image).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lotus.errors import LotusError

# ---------------------------------------------------------------------------------------------
# Devices

# What torch.device accepts, as its error message lists it (torch 2.x), with an optional index.
DEVICE_TYPES = ("cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia", "xla")
DEVICE_TYPES += ("lazy", "vulkan", "mps", "meta", "hpu", "mtia", "privateuseone")
_DEVICE = re.compile(rf"(?:{'|'.join(DEVICE_TYPES)})(?::(?:0|[1-9][0-9]{{0,8}}))?")


def check_device(name: str) -> None:
    """Refuse a device string torch cannot parse ('gpu', 'cuda:x'), without looking for the device."""
    if name != "auto" and not (isinstance(name, str) and _DEVICE.fullmatch(name)):
        raise LotusError(f"--device {name!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


# ---------------------------------------------------------------------------------------------
# Data

BUILTIN_DATASETS = ("digits", "cifar10")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision's CIFAR10 unpacks into data_dir
CLASSES_FILE = "classes.tsv"  # beside train/ and test/: a class folder, a tab, the class's words, per line


LOADERS = ("auto", "memory", "stream")
MEMORY_BUDGET = 0.25  # share of the machine's memory a decoded training split may take before it is streamed
HOLDOUT_SEED = 0  # seeds which training images are held out for validation: fixed, so every stage holds out the same


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # 'digits', 'cifar10', or the path of an ImageFolder root
    data_dir: str = "data"  # folder holding torchvision's CIFAR-10 (only used for 'cifar10')
    download: bool = False  # let torchvision download CIFAR-10 into data_dir when missing
    img_size: int | None = None  # square side in pixels the images are resized to; None = native
    # share of each class of the training split held out as the validation split, which every choice
    # reads (never trained on); ignored when an ImageFolder root has val/ beside train/ and test/;
    # 0 = no validation split (then no stage may choose by accuracy: no --sparsity auto)
    val_fraction: float = 0.05
    # where the images live while training: 'memory' (decoded once, uint8), 'stream' (read from the
    # files by loader workers, batch by batch), or 'auto' (memory when the decoded training split
    # fits MEMORY_BUDGET of the machine's memory, else stream); see lotus.data and lotus.stream
    loader: str = "auto"
    workers: int | None = None  # loader worker processes; None = min(8, CPU cores)
    # how the validation and test splits (and served images) are resized: None = the whole image to
    # the square input; a share in [0.5, 1] = as timm evaluates, the shorter side to img_size /
    # crop_pct and the centre img_size x img_size cut out (timm's ViT weights: 0.9). Training
    # images are never cut: tickets score, and augmentation crops from, the whole image. At least
    # 0.5, so the resized side (at most 2x the input) stays under the 3x a large photo is first
    # reduced to (lotus.images.REDUCING_GAP).
    crop_pct: float | None = None

    def __post_init__(self):
        if self.loader not in LOADERS:
            raise LotusError(f"--loader {self.loader!r} is not one of: {', '.join(LOADERS)}")
        if self.workers is not None and not self.workers >= 0:
            raise LotusError(f"--workers {self.workers} is negative: pass 0 (load in the training process) or more")
        if self.img_size is not None and not self.img_size >= 1:
            raise LotusError(f"--img-size {self.img_size} is below 1: pass a side in pixels, or leave it out for the native size")
        if self.crop_pct is not None and not 0.5 <= self.crop_pct <= 1:
            raise LotusError(
                f"--crop-pct {self.crop_pct} is outside [0.5, 1]: it is the share of the resized image's shorter side "
                "evaluation keeps, e.g. 0.9 as timm evaluates ViTs (leave it out to resize whole images)"
            )
        if not 0 <= self.val_fraction <= 0.5:
            raise LotusError(
                f"--val-fraction {self.val_fraction} is outside [0, 0.5]: it is the share of the training images held "
                "out for validation, e.g. 0.05 (0: none)"
            )


def class_names(cfg: DataConfig) -> list[str]:
    """The dataset's class names in label order, found without decoding an image (so in
    milliseconds); raises the loader's errors for a dataset that is not there."""
    if cfg.name == "digits":
        return [str(c) for c in range(10)]
    if cfg.name == "cifar10":
        if not cfg.download and not (Path(cfg.data_dir) / CIFAR10_FOLDER).is_dir():
            raise cifar10_missing(Path(cfg.data_dir))
        return list(CIFAR10_CLASSES)
    root = Path(cfg.name)
    classes = class_folders(split_dir(root, "train"))
    for split in ("test", "val") if validation_folder(cfg) else ("test",):
        if class_folders(split_dir(root, split)) != classes:
            raise LotusError(f"class folders of {split_dir(root, split)} differ from those of {root / 'train'}: they must match")
    return classes


def class_labels(cfg: DataConfig, classes: list[str]) -> list[str]:
    """The names people see for `classes` (in label order): an ImageFolder root's classes.tsv
    words where it has one, else the class names themselves."""
    if cfg.name in BUILTIN_DATASETS:
        return list(classes)
    return class_words(Path(cfg.name), classes)


def class_words(root: Path, classes: list[str]) -> list[str]:
    """The first of each class folder's words in `root`/classes.tsv ("n02124075<TAB>Egyptian cat";
    "tabby, tabby cat" gives "tabby"), in the order of `classes`; the folder names themselves
    without the file. Lines for folders the data lacks are ignored.

    Raises:
        LotusError: a line without a tab or without words, or a class folder the file does not name.
    """
    path = root / CLASSES_FILE
    if not path.is_file():
        return list(classes)
    words = _read_class_words(path)
    missing = [name for name in classes if name not in words]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LotusError(
            f"{path} has no line for the class folder{'s' if len(missing) > 1 else ''} {', '.join(missing[:3])}{more}: "
            "add a line 'FOLDER<TAB>words' for each class, or remove the file to show the folder names"
        )
    return [words[name] for name in classes]


def _read_class_words(path: Path) -> dict[str, str]:
    """classes.tsv as {folder name: first synonym of its words}."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LotusError(f"cannot read {path} ({e}): write it as UTF-8 text, one 'FOLDER<TAB>words' line per class") from None
    words: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        folder, tab, text = line.partition("\t")
        folder, first = folder.strip(), text.split(",")[0].strip()  # "tabby, tabby cat": synonyms, the first one is the label
        if not tab or not folder:
            raise LotusError(
                f"{path} line {number} ({line.strip()[:40]!r}) has no tab after a folder name: "
                "write each line as the class folder's name, a tab, then the class's words"
            )
        if not first:
            raise LotusError(f"{path} line {number} gives no words for {folder}: write the class's words after the tab")
        words[folder] = first
    return words


def cifar10_missing(root: Path) -> LotusError:
    return LotusError(
        f"CIFAR-10 not found in {root}: pass --download to fetch it, --data-dir to point at it, "
        "or --data PATH for an ImageFolder copy (train/ and test/ class folders)"
    )


def boxes_missing(path: str | Path) -> LotusError:
    return LotusError(f"boxes file {path} not found: pass the dataset's boxes.tsv (split, path, x0, y0, x1, y1 per image)")


def class_folders(split: Path) -> list[str]:
    """The class folder names of an ImageFolder split, sorted (their label order)."""
    classes = sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise LotusError(f"{split} holds no class folders: put each class's images in {split}/<class>/")
    return classes


def split_dir(root: Path, split: str) -> Path:
    """The folder of an ImageFolder root's 'train', 'val' or 'test' split (for 'test': test/, else val/)."""
    if not root.is_dir():
        raise LotusError(
            f"dataset {str(root)!r} is neither 'digits', 'cifar10' nor a folder: "
            "pass --data digits|cifar10|PATH to an ImageFolder root"
        )
    names = {"train": ("train",), "val": ("val",)}.get(split, ("test", "val"))
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise LotusError(
        f"{root} has no {' or '.join(n + '/' for n in names)} folder: an ImageFolder root holds "
        "train/ and test/ (or val/), each with one folder of images per class"
    )


def validation_folder(cfg: DataConfig) -> Path | None:
    """An ImageFolder root's val/ when it is the validation split: beside both train/ and test/ (a
    root with train/ and val/ alone tests on val/, and holds validation images out of train/)."""
    if cfg.name in BUILTIN_DATASETS:
        return None
    root = Path(cfg.name)
    return root / "val" if all((root / name).is_dir() for name in ("train", "val", "test")) else None


def holdout(cfg: DataConfig) -> dict[str, Any]:
    """Where the validation split comes from, as checkpoints and tickets record it.

    `source` is 'val/' (an ImageFolder's own folder), 'held out of train' or None (no
    validation split); `fraction` is the share of each training class held out (0 unless held
    out), drawn with `seed`. Two runs with the same record train on the same images.
    """
    folder = validation_folder(cfg) is not None
    fraction = 0.0 if folder else float(cfg.val_fraction)
    source = "val/" if folder else "held out of train" if fraction else None
    return {"source": source, "fraction": fraction, "seed": HOLDOUT_SEED}


def recorded_holdout(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The hold-out a checkpoint's sidecar records (`holdout`, else the `val_fraction` of its data
    record); a LOTUS checkpoint trained before hold-outs existed trained on the whole training split
    (fraction 0). None when it records no data at all: nothing to check."""
    if "holdout" in meta:
        return meta["holdout"]
    if "data" not in meta:
        return None
    fraction = float(meta["data"].get("val_fraction", 0.0))
    return {"source": "held out of train" if fraction else None, "fraction": fraction, "seed": HOLDOUT_SEED}


def check_holdout(meta: dict[str, Any], cfg: DataConfig, checkpoint: str | Path) -> None:
    """Refuse a checkpoint trained with another validation hold-out than `cfg`'s: its validation
    images could be ones it trained on, and its training split is not this run's.

    Args:
        meta: the checkpoint's sidecar (a checkpoint that records no data is taken as it is).
    """
    recorded, wanted = recorded_holdout(meta), holdout(cfg)
    if recorded is None or (recorded["fraction"], recorded["seed"]) == (wanted["fraction"], wanted["seed"]):
        return
    held = recorded["fraction"]
    raise LotusError(
        f"--checkpoint {checkpoint} was trained with {held:g} of each class held out for validation, this run "
        f"holds out {wanted['fraction']:g}: its validation images could be ones it trained on. Pass --val-fraction {held:g} "
        + ("(no validation split: nothing may then be chosen by accuracy, such as --sparsity auto) " if not held else "")
        + "or train the checkpoint again with this hold-out"
    )


def needs_validation(cfg: DataConfig, what: str) -> None:
    """Refuse `what` (a choice made on the validation split) when `cfg` has no validation split."""
    if holdout(cfg)["source"] is None:
        raise LotusError(
            f"{what} chooses on the validation split and --val-fraction 0 leaves none: pass a --val-fraction above 0 "
            "(default 0.05)"
        )


# ---------------------------------------------------------------------------------------------
# Model

DEFAULT_MODEL = "vit_tiny_patch16_224"  # ViT-Tiny shape: width 192, depth 12, 3 heads
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")  # what timm reads (.npz: Google's JAX ViT weights)


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL  # any timm VisionTransformer architecture
    num_classes: int = 10  # classifier outputs
    img_size: int = 32  # square input side in pixels (training sets it to the data's)
    patch_size: int | None = None  # square patch side in pixels; None = default_patch_size(img_size)
    depth: int | None = None  # number of blocks; None = the architecture's own
    # starting weights: False = random, True = timm's hub weights (needs a network), or the path of a
    # timm weight file (WEIGHT_FILE_SUFFIXES, e.g. copied from a hub cache), adapted by timm to this model
    pretrained: bool | str = False
    drop_path_rate: float = 0.1  # stochastic depth at the last block (linear from 0)

    def __post_init__(self):
        for flag, value in (("num_classes", self.num_classes), ("--img-size", self.img_size)):
            if not value >= 1:
                raise LotusError(f"{flag} {value} is below 1")
        for flag, value in (("--patch-size", self.patch_size), ("--depth", self.depth)):
            if value is not None and not value >= 1:
                raise LotusError(f"{flag} {value} is below 1: pass 1 or more, or leave it out for the default")
        if not 0 <= self.drop_path_rate < 1:
            raise LotusError(f"drop_path_rate {self.drop_path_rate} is outside [0, 1)")
        if isinstance(self.pretrained, str) and not self.pretrained.endswith(WEIGHT_FILE_SUFFIXES):
            raise LotusError(
                f"--pretrained-path {self.pretrained!r} is not a timm weight file: pass a {', '.join(WEIGHT_FILE_SUFFIXES[:-1])} "
                f"or {WEIGHT_FILE_SUFFIXES[-1]} file (a hub cache holds model.safetensors), or --pretrained for the hub weights"
            )

    @property
    def pretrained_file(self) -> str | None:
        """The weight file the model starts from (None: hub weights or none)."""
        return self.pretrained if isinstance(self.pretrained, str) else None

    def check(self) -> None:
        """Refuse an architecture LOTUS cannot build (no weights are made, nothing is downloaded)."""
        self.check_grid()
        import timm  # imports torch: the one check that needs it, so callers run it last

        if not timm.is_model(self.name):
            raise LotusError(f"unknown timm model {self.name!r}: list ViTs with `timm.list_models('vit_*')`")
        if timm.models.model_entrypoint(self.name).__module__ not in ("timm.models.vision_transformer", "timm.models.deit"):
            raise LotusError(f"{self.name} is not a timm VisionTransformer: pick a vit_* or deit_* model with --model")

    def check_grid(self) -> None:
        """Refuse an image side the patches do not tile."""
        patch_size = self.patch_size or default_patch_size(self.img_size)
        if self.img_size % patch_size:
            raise LotusError(f"--img-size {self.img_size} is not a multiple of --patch-size {patch_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // (self.patch_size or default_patch_size(self.img_size))

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def weight_file_missing(path: str | Path) -> LotusError:
    return LotusError(
        f"--pretrained-path {path} not found: pass a timm weight file (model.safetensors in a hub cache), "
        "or --pretrained alone for timm's hub weights"
    )


def default_patch_size(img_size: int) -> int:
    """Patch side: a 4x4 grid up to 16px, 4px patches up to 64px, timm's usual 16px beyond."""
    if img_size <= 16:
        return max(1, img_size // 4)
    if img_size <= 64:
        return 4
    return 16


# ---------------------------------------------------------------------------------------------
# Training


AUGMENTS = ("auto", "none", "crop", "rrc", "randaug")


BASELINE_TEACHER = "baseline"  # a compress recipe's `finetune.distill`: distil from the dense baseline of the run


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # passes over the training split
    batch_size: int = 128  # images per optimizer step
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_epochs: float = 2.0  # linear warm-up from 0, in epochs
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms, biases, embeddings)
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 0  # seeds the weights, the batch order, augmentation and dropout
    device: str = "auto"  # 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'
    # 'crop' (zero-pad and crop back, CIFAR-style, + flip), 'rrc' (timm's RandomResizedCrop + flip),
    # 'randaug' (rrc + timm's RandAugment rand-m9-mstd0.5-inc1), 'none', or 'auto' (crop for
    # images held in memory, rrc for streamed ones); digits are never flipped
    augment: str = "auto"
    mixup: float = 0.0  # timm's Mixup alpha: blend each image with another, labels alike (0: off; DeiT: 0.8)
    cutmix: float = 0.0  # timm's CutMix alpha: paste a box of another image (0: off; DeiT: 1.0); with both, half the batches each
    compile: bool = True  # torch.compile the training step on CUDA (the CPU never compiles)
    # drop-aware training: each step keeps the patches the exported graph would keep (select_block's
    # class-token attention) at one of these drop ratios, in turn; () trains on every patch
    drop_aware: tuple[float, ...] = ()
    select_block: int | None = None  # the block that picks them; None = depth // 6, as the export
    # knowledge distillation (Hinton et al. 2015): a LOTUS checkpoint of the same classes and input
    # (the dense model a compressed one comes from) whose predictions on each whole training image
    # the model also learns: loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher || model) at temperature T
    distill: str | None = None  # in a compress recipe's fine-tuning, BASELINE_TEACHER: the run's dense baseline
    distill_weight: float = 0.5  # w
    distill_temperature: float = 1.0  # T

    def __post_init__(self):
        object.__setattr__(self, "drop_aware", tuple(float(d) for d in self.drop_aware))  # a recipe's list
        if not all(0 <= d < 1 for d in self.drop_aware):
            raise LotusError(f"--drop-aware {list(self.drop_aware)}: each drop ratio must be in [0, 1), e.g. 0.5 or 0.3,0.5")
        if self.select_block is not None and not self.drop_aware:
            raise LotusError(f"--select-block {self.select_block} sets drop-aware training's select block: add --drop-aware R")
        if not 0 <= self.distill_weight <= 1:
            raise LotusError(
                f"--distill-weight {self.distill_weight} is outside [0, 1]: pass e.g. 0.5 (half cross-entropy, half the teacher)"
            )
        if not self.distill_temperature > 0:
            raise LotusError(f"--distill-temperature {self.distill_temperature} is not above 0: pass e.g. 1 or 4")
        if self.augment not in AUGMENTS:
            raise LotusError(f"--aug {self.augment!r} is not one of: {', '.join(AUGMENTS)}")
        if not self.epochs >= 1:
            raise LotusError(f"--epochs {self.epochs} is below 1: training needs at least one pass over the data")
        if not self.batch_size >= 1:
            raise LotusError(f"--batch-size {self.batch_size} is below 1: a step needs at least one image")
        if not self.lr > 0:
            raise LotusError(f"--lr {self.lr} is not above 0: pass a positive peak learning rate such as 5e-4")
        nonnegative = {"--warmup-epochs": self.warmup_epochs, "--weight-decay": self.weight_decay}
        nonnegative |= {"--mixup": self.mixup, "--cutmix": self.cutmix}
        for flag, value in nonnegative.items():
            if not value >= 0:
                raise LotusError(f"{flag} {value} is negative: pass 0 or more")
        if not self.min_lr >= 0 or not self.grad_clip >= 0:
            raise LotusError(f"min_lr {self.min_lr} and grad_clip {self.grad_clip} must be 0 or more")
        if not 0 <= self.label_smoothing < 1:
            raise LotusError(f"--label-smoothing {self.label_smoothing} is outside [0, 1): pass e.g. 0.1, or 0 for none")
        check_device(self.device)


def default_configs(data_name: str) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """The configs `lotus train --data NAME` starts from before its flags apply.

    The digits are 8x8: upsampled to 16x16 with 4x4 patches (16 tokens, as on an 8x8 grid of
    2x2 patches but with smoother patch embeddings, which learn faster), and a 4-block ViT-Tiny
    trained with small batches: 1,437 training images give few steps per epoch.
    """
    if data_name == "digits":
        return (
            DataConfig("digits", img_size=16),
            ModelConfig(depth=4, drop_path_rate=0.0),
            TrainConfig(epochs=20, batch_size=32, lr=5e-4, warmup_epochs=1.0),
        )
    return DataConfig(data_name), ModelConfig(), TrainConfig()


# ---------------------------------------------------------------------------------------------
# Data lottery tickets


@dataclass(frozen=True)
class TicketConfig:
    drop: float = 0.1  # fraction of each image's patches dropped, in [0, 1)
    select: str = "random"  # 'random' (measured level with attention or ahead of it) or 'attention' (scored by the model)
    method: str = "cls"  # 'cls' (class-token attention row), 'rollout', or 'grad' (gradient-weighted rollout)
    layers: tuple[int, ...] | str | None = "all"  # blocks used (negative counts from the end) or 'all'; None = 'all'
    cls_sink: bool = True  # replace the class token's self-attention by its row mean
    norm_outliers: bool = True  # replace scores of high-norm outlier patches by their neighbours' mean
    outlier_z: float = 3.5  # robust z-score above which a patch's output norm is an outlier...
    outlier_ratio: float = 2.0  # ...if it is also this many times its image's median norm
    temperature: float = 0.0  # 0: fixed top-K tickets; > 0: K patches re-drawn per batch, weight score ** (1 / T)
    spread: int = 1  # 1: the K best of the image; S > 1: every S x S block of patches keeps its best first
    balance: bool = False  # rank each score among all images' at its position: every position kept equally often
    fuse: bool = False  # train on K kept patches plus one token fusing the dropped ones (EViT)
    batch_size: int = 256  # images per scoring pass
    seed: int = 0  # seed of the random control
    boxes: str | None = None  # the data's boxes.tsv: measure how much of each image's object the tickets keep

    def __post_init__(self):
        if self.layers is None:  # recorded as what it means, so saved tickets say which blocks scored them
            object.__setattr__(self, "layers", "all")
        if not 0 <= self.drop < 1:
            raise LotusError(f"--drop {self.drop} is outside [0, 1): it is the fraction of patches dropped")
        if self.select not in ("attention", "random"):
            raise LotusError(f"--select {self.select!r} is not one of: attention, random")
        if self.method not in ("cls", "rollout", "grad"):
            raise LotusError(f"--method {self.method!r} is not one of: cls, rollout, grad")
        if isinstance(self.layers, str) and self.layers != "all":
            raise LotusError(f"--layers {self.layers!r} is not 'all' or a comma-separated list of block numbers")
        if self.spread < 1:
            raise LotusError(f"--spread {self.spread} must be at least 1 (the side of the patch blocks, 1 = whole image)")
        if self.select == "random" and (scoring := self._attention_settings()):
            raise LotusError(
                f"{', '.join(scoring)} set how attention scores patches, but these tickets are random: add --select attention"
            )
        if not self.temperature >= 0:
            raise LotusError(
                f"--temperature {self.temperature} is negative: use 0 for fixed tickets or a positive value to sample"
            )
        if not self.batch_size >= 1:
            raise LotusError(f"ticket batch_size {self.batch_size} is below 1: score 1 or more images per pass")

    def _attention_settings(self) -> list[str]:
        """The options given that only attention tickets use, as typed."""
        layers = self.layers if isinstance(self.layers, str) else ",".join(map(str, self.layers))
        given = {
            f"--method {self.method}": self.method != "cls",
            f"--layers {layers}": layers != "all",
            "--no-cls-sink": not self.cls_sink,
            "--no-norm-outliers": not self.norm_outliers,
            "--balance": self.balance,
        }
        return [option for option, set_ in given.items() if set_]

    def check_model(self, depth: int | None, grid: int) -> None:
        """Refuse settings that do not fit a model of `depth` blocks (None: not known yet) on a `grid` x `grid` patch grid."""
        check_spread(self.spread, grid)
        if depth is not None and self.select == "attention":
            resolve_layers(self, depth)


def parse_layers(text: str | None) -> tuple[int, ...] | str | None:
    """`--layers` as typed: None (not given: all blocks), 'all', or block numbers such as '9,10,11'."""
    if not text or text.strip() == "all":
        return text.strip() if text else None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise LotusError(f"--layers {text!r} is not 'all' or a comma-separated list of block numbers") from None


def resolve_layers(cfg: TicketConfig, depth: int) -> list[int]:
    if cfg.layers == "all":
        return list(range(depth))
    layers = cfg.layers
    resolved = sorted({layer % depth for layer in layers if -depth <= layer < depth})
    if len(resolved) != len(set(layers)):
        raise LotusError(f"--layers {list(layers)} names blocks outside 0..{depth - 1}")
    return resolved


def check_spread(spread: int, grid: int) -> None:
    if grid % spread:
        raise LotusError(f"--spread {spread} does not divide the {grid}x{grid} patch grid: use a divisor of {grid}")


# ---------------------------------------------------------------------------------------------
# Pruning

EXTRA_PRUNABLE = {"patch_embed": "patch_embed.proj.weight", "head": "head.weight"}
DEFAULT_SPARSITIES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
WIDE_SPARSITIES = DEFAULT_SPARSITIES + (0.6, 0.7, 0.8, 0.9)
IMPORTANCE = ("magnitude", "activation", "taylor")


def nm_pattern(sparsity: float | str) -> tuple[int, int] | None:
    """(n, m) for an N:M pattern written 'n:m' (e.g. '2:4'); None for a plain sparsity."""
    if not isinstance(sparsity, str) or ":" not in sparsity:
        return None
    n, _, m = sparsity.partition(":")
    if not (n.strip().isdigit() and m.strip().isdigit()) or not 0 < int(n) < int(m):
        raise LotusError(f"sparsity pattern {sparsity!r} is not N:M with 0 < N < M (2:4 is what NVIDIA GPUs accelerate)")
    return int(n), int(m)


@dataclass(frozen=True)
class PruneConfig:
    scope: str = "global"  # 'global': one magnitude ranking over all prunable weights; 'layer': each to the same sparsity
    include: tuple[str, ...] = ()  # extra weights to prune beside the blocks' Linears: 'patch_embed', 'head'

    def __post_init__(self):
        if self.scope not in ("global", "layer"):
            raise LotusError(f"--scope {self.scope!r} is not 'global' or 'layer'")
        for extra in self.include:
            if extra not in EXTRA_PRUNABLE:
                raise LotusError(f"--include {extra!r} is not one of: {', '.join(EXTRA_PRUNABLE)}")


@dataclass(frozen=True)
class SweepConfig:
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES  # one-shot sparsities to evaluate
    tolerance: float = 1.0  # accuracy points below dense still counted as "no loss" (the knee)
    prune: PruneConfig = PruneConfig()

    def __post_init__(self):
        if not self.sparsities or not all(0 <= s < 1 for s in self.sparsities):
            raise LotusError(f"--sparsities {list(self.sparsities)}: give one or more fractions in [0, 1), e.g. 0.1,0.3,0.5")
        if not self.tolerance >= 0:
            raise LotusError(
                f"--tolerance {self.tolerance} is negative: it is the accuracy points below dense still counted as no loss"
            )


@dataclass(frozen=True)
class ISPConfig:
    target: float = 0.5  # overall sparsity of the prunable weights after stage 2
    rounds: int = 2  # sparsity rises linearly from the starting sparsity to `target` over the rounds
    copies: int = 5  # weak copies per round
    data_fraction: float = 0.1  # share of the training split each weak copy sees
    epochs: int = 1  # passes of each weak copy over its slice
    lr: float = 1e-4  # weak copies' learning rate (constant after a short warm-up)
    merge: str = "union"  # 'union', 'vote', 'intersection', or 'levels' (one set of weights at several sparsities)
    min_votes: int | None = None  # for merge='vote': copies that must keep a weight
    soup: bool = True  # start the next round from the average of the copies' weights
    seed: int = 0  # seeds the slices and the copies
    prune: PruneConfig = PruneConfig()

    def __post_init__(self):
        if not 0 < self.target < 1:
            raise LotusError(f"--target {self.target} is outside (0, 1): it is the sparsity ISP ends at, e.g. 0.5")
        for flag, value in (("--rounds", self.rounds), ("--copies", self.copies), ("--epochs", self.epochs)):
            if not value >= 1:
                raise LotusError(f"ISP {flag} {value} is below 1: pass 1 or more")
        if not 0 < self.data_fraction <= 1:
            raise LotusError(f"--data-fraction {self.data_fraction} is outside (0, 1]: it is each weak copy's share of the data")
        if not self.lr > 0:
            raise LotusError(f"ISP --lr {self.lr} is not above 0: pass a positive learning rate such as 1e-4")
        if self.merge not in ("union", "vote", "intersection", "levels"):
            raise LotusError(f"--merge {self.merge!r} is not one of: union, vote, intersection, levels")
        if self.merge == "vote" and not (self.min_votes is not None and 1 <= self.min_votes <= self.copies):
            raise LotusError(f"--merge vote needs --min-votes between 1 and --copies {self.copies} (got {self.min_votes})")


@dataclass(frozen=True)
class StructuredConfig:
    heads: float = 0.0  # fraction of the attention heads removed (0 = none)
    mlp: float = 0.0  # fraction of the MLP hidden neurons removed (0 = none)
    importance: str = "magnitude"  # 'magnitude' (weights only), 'activation' or 'taylor' (calibration data)
    scope: str = "block"  # 'block': the same share from every block; 'global': ranked across blocks
    calib_images: int = 512  # training images 'activation' and 'taylor' are measured on
    seed: int = 0  # which calibration images

    @property
    def enabled(self) -> bool:
        return self.heads > 0 or self.mlp > 0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse fields no model can take (names as `lotus compress --structure` and `lotus prune structured` spell them)."""
        if self.importance not in IMPORTANCE:
            raise LotusError(f"structured importance {self.importance!r} is not one of: {', '.join(IMPORTANCE)}")
        if self.scope not in ("block", "global"):
            raise LotusError(f"structured scope {self.scope!r} is not 'block' or 'global'")
        for what, fraction in (("heads", self.heads), ("mlp", self.mlp)):
            if not 0 <= fraction < 1:
                raise LotusError(
                    f"--structure {what}={fraction} is outside [0, 1): it is the share of the {what} removed, e.g. 0.25"
                )
        if not self.calib_images >= 1:
            raise LotusError(f"--calib-images {self.calib_images} is below 1: importance is measured on 1 or more images")


# ---------------------------------------------------------------------------------------------
# The whole pipeline (`lotus compress`)


@dataclass(frozen=True)
class CompressConfig:
    data: DataConfig = DataConfig("digits", img_size=16)  # the dataset (see lotus.data)
    checkpoint: str | None = None  # dense model to compress; None = train the baseline first
    model: ModelConfig = ModelConfig(depth=4, drop_path_rate=0.0)  # the baseline to train when no checkpoint
    baseline: TrainConfig = TrainConfig(epochs=20, batch_size=32, lr=5e-4, warmup_epochs=1.0)  # its training
    tickets: TicketConfig = TicketConfig(drop=0.1)  # data lottery tickets
    sparsity: float | str = 0.3  # stage-1 one-shot sparsity of the prunable weights, 'auto' (the knee), or '2:4'
    sweep: SweepConfig = SweepConfig()  # the sweep behind 'auto' (its tolerance sets the knee)
    prune: PruneConfig = PruneConfig()  # what is pruned and how it is ranked
    isp_target: float | None = None  # stage-2 ISP target sparsity; None skips stage 2
    isp: ISPConfig = ISPConfig()  # stage-2 settings (its target is isp_target)
    structure: StructuredConfig = StructuredConfig()  # heads / MLP neurons to remove (none by default)
    finetune: TrainConfig = TrainConfig(epochs=5, batch_size=32, lr=2.5e-4, warmup_epochs=0.5)  # fine-tuning on lottery data
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N'

    def __post_init__(self):
        object.__setattr__(self, "sparsity", _sparsity_level(self.sparsity))  # '0.3' (a flag, a recipe) -> 0.3
        if self.isp_target is not None:
            if not 0 < self.isp_target < 1:
                raise LotusError(
                    f"--isp-target {self.isp_target} is outside (0, 1): it is the sparsity stage 2 ends at; "
                    "pass e.g. 0.5, or leave it out to skip ISP"
                )
            if isinstance(self.sparsity, float) and not self.isp_target > self.sparsity:
                raise LotusError(
                    f"--isp-target {self.isp_target} is not above --sparsity {self.sparsity}: ISP prunes on from "
                    "stage 1's sparsity, so raise --isp-target or lower --sparsity"
                )
        check_device(self.device)


def _sparsity_level(value: float | str) -> float | str:
    """--sparsity as the stages take it: 'auto', an N:M pattern such as '2:4', or a fraction in [0, 1)."""
    if value == "auto":
        return value
    if isinstance(value, str) and ":" in value:
        try:
            nm_pattern(value)
        except LotusError:
            raise LotusError(f"--sparsity {value} is not an N:M pattern with 0 < N < M: use e.g. 2:4") from None
        return value
    try:
        level = float(value)
    except ValueError:
        raise LotusError(f"--sparsity {value!r} is not a number, 'auto' or an N:M pattern: pass e.g. 0.3, auto or 2:4") from None
    if not 0 <= level < 1:
        raise LotusError(f"--sparsity {value} is outside [0, 1): it is the fraction of the prunable weights pruned, e.g. 0.3")
    return level


def default_compress_config(data_name: str) -> CompressConfig:
    """Settings for a dataset: its baseline recipe, and fine-tuning at half its learning rate."""
    data_cfg, model_cfg, train_cfg = default_configs(data_name)
    finetune = replace(train_cfg, epochs=5, lr=train_cfg.lr / 2, warmup_epochs=0.5)
    return CompressConfig(data=data_cfg, model=model_cfg, baseline=train_cfg, finetune=finetune)
