"""ONNX export of a LOTUS model that drops patches on request, verified against PyTorch.

Two graphs, both with a dynamic batch axis and self-contained (no external data file):

- `model.onnx`, inputs `pixel_values` float32 [B, 3, H, W] (normalised as the metadata says)
  and `drop` float32 scalar in [0, 1): the fraction of patches to skip. K = N - round(drop * N)
  patches are kept per image, chosen by the model's own class-token attention in block
  `select_block` (default depth // 6: block 2 of 12). Blocks before that one run on every
  token; it computes keys and values for every token and the rest of its work for the class token
  and the K kept patches only, and the later blocks run on those, so latency falls with the drop
  ratio. The block is a trade: an earlier choice saves more compute per dropped patch, a later
  one is better informed (`benchmarks/cifar10_select_block.py` measures it for a model).
  drop = 0 gives the dense model's logits.
- `model_keep_idx.onnx`, inputs `pixel_values` and `keep_idx` int64 [B, K]: the caller brings
  its own patch indices (e.g. tickets); patches are gathered right after the positional
  embedding, exactly as in lottery training.

The export chooses nothing by accuracy: the select block is a setting, and the test images it
reads serve verification (a logit comparison, which any images would do) and the int8 accuracy
report.

Output `logits` float32 [B, classes]. The metadata (`metadata_props`) carries the input size,
mean and std, patch size, class names and the labels people see for them, measured sparsity, training drop ratio and the LOTUS
version, so any ONNX user can preprocess correctly without the run folder.

`exported_keep_idx` reads which patches `model.onnx` keeps (its select block's TopK, exposed as
an extra output of the graph in memory), and `exported_coverage` how much of each image's object
box they cover (see `lotus.coverage`); with `ExportConfig.boxes` the export reports the latter on
the test images at drop 0.1, 0.3 and 0.5.

`export_merging` writes the training-free peer of patch dropping, token merging (`lotus.merge`,
ToMe), as a graph with a fixed number of merges per block. With `ExportConfig.merge` > 0,
`export_onnx` writes that graph instead of the dropping one, verified and with the same
metadata (plus `merge_per_block`): input `pixel_values` only, every patch read, r tokens fewer
after each block. `lotus serve` serves it (a request's drop must then be 0).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lotus
from lotus.checkpoint import labels_of, load_model
from lotus.coverage import ImageBoxes, match_boxes, selection_coverage
from lotus.data import BatchLoader, DataConfig, ImageData, load_split_for_model
from lotus.drop import num_keep, select_block_of
from lotus.errors import LotusError
from lotus.masks import prunable_names
from lotus.merge import TokenMerging, forward_merging
from lotus.runtime import graph_feed, lotus_metadata, ort_session
from lotus.vit import TokenGatherViT

VERIFY_DROPS = (0.0, 0.1, 0.3, 0.5)
KEEP_IDX_SUFFIX = "_keep_idx"


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18  # ONNX opset of the graph
    select_block: int | None = None  # block whose class-token attention picks the patches; None = depth // 6
    verify: bool = True  # compare ONNX Runtime with PyTorch on eval images at VERIFY_DROPS
    tolerance: float = 1e-4  # max |logit difference| verification accepts (fp32)
    verify_images: int = 64  # eval images verification runs
    quantize: str | None = None  # 'int8': dynamic per-channel signed int8 weights (ONNX Runtime)
    boxes: str | None = None  # the eval data's boxes.tsv: report the object coverage of the graph's kept patches
    merge: int = 0  # > 0: a token-merging graph (ToMe's r, tokens merged per block), no drop input, no keep-index twin


class DropByAttention(torch.nn.Module):
    """The exported graph: pixel_values, drop -> logits."""

    def __init__(self, model: TokenGatherViT, select_block: int):
        super().__init__()
        self.model = model
        self.select_block = select_block
        self.num_patches = model.patch_embed.num_patches

    def forward(self, pixel_values: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        n = self.num_patches
        keep = num_keep(n, drop).item()
        torch._check(keep >= 1)
        torch._check(keep <= n)
        return self.model.forward_dropping(pixel_values, keep, self.select_block)


class KeepIndices(torch.nn.Module):
    """The exported graph: pixel_values, keep_idx -> logits."""

    def __init__(self, model: TokenGatherViT):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, keep_idx)


def keep_idx_path(path: Path) -> Path:
    return path.with_name(path.stem + KEEP_IDX_SUFFIX + path.suffix)


def _export(module: torch.nn.Module, args: tuple, input_names: list[str], dynamic_shapes: tuple, opset: int, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            input_names=input_names,
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )


def _metadata(meta: dict[str, Any], model: TokenGatherViT, select_block: int, extra: dict[str, Any]) -> dict[str, str]:
    pre = meta["preprocess"]
    sparsity = meta.get("sparsity", {}).get("overall", 0.0)
    return {
        "lotus_version": lotus.__version__,
        "img_size": str(pre["img_size"]),
        "patch_size": str(model.patch_embed.patch_size[0]),
        "num_patches": str(model.patch_embed.num_patches),
        "mean": json.dumps(pre["mean"]),
        "std": json.dumps(pre["std"]),
        "resize": pre.get("resize", ""),
        "crop_pct": json.dumps(pre.get("crop_pct")),
        "classes": json.dumps(pre["classes"]),
        "labels": json.dumps(labels_of(pre)),
        "sparsity": f"{sparsity:.6f}",
        "train_drop": str((meta.get("tickets") or {}).get("drop", 0.0)),
        "select_block": str(select_block),
        "inputs": "pixel_values float32 [B,3,H,W] normalised (x/255 - mean) / std; drop float32 scalar in [0, 1)",
        **{k: str(v) for k, v in extra.items()},
    }


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def check_exported_sparsity(path: Path, model: TokenGatherViT, names: list[str]) -> dict[str, Any]:
    """The pruned weights must reach the graph with their zeros: every prunable weight is found
    among the initializers (as is, or transposed, as the exporter's folding leaves it), so the
    exported sparsity is measured on the file, not assumed."""
    import onnx
    from onnx import numpy_helper

    by_shape: dict[tuple, list[np.ndarray]] = {}
    for init in onnx.load(str(path)).graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2 and arr.dtype == np.float32:
            by_shape.setdefault(arr.shape, []).append(arr)
    params = dict(model.named_parameters())
    zeros = size = 0
    for name in names:
        w = params[name].detach().cpu().numpy()
        found = next((a for a in by_shape.get(w.shape, []) if np.array_equal(a, w)), None)
        if found is None:
            found = next((a.T for a in by_shape.get(w.T.shape, []) if np.array_equal(a.T, w)), None)
        if found is None:
            raise LotusError(f"the exported graph does not hold {name} unchanged: the export is not faithful")
        zeros += int((found == 0).sum())
        size += found.size
    expected = sum(int((params[n] == 0).sum()) for n in names)
    return {"exported_sparsity": zeros / max(size, 1), "checkpoint_sparsity": expected / max(size, 1)}


def eval_images(data: ImageData, pre: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split, normalised as the model's preprocessing says, and its labels: what `accuracy_onnx` takes."""
    if data.streamed:
        data = data.take(torch.arange(len(data)))
    batch = next(iter(BatchLoader(data, len(data), pre["mean"], pre["std"])))
    return batch.images, batch.labels


def verify(
    path: Path, model: TokenGatherViT, images: torch.Tensor, select_block: int, tolerance: float, merge: int = 0
) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| logit difference at each drop ratio (a merging graph: at its
    r, keyed 'rR'); raises above tolerance."""
    session = ort_session(path)
    n = model.patch_embed.num_patches
    diffs = {}
    for drop in (0.0,) if merge else VERIFY_DROPS:
        setting = f"r{merge}" if merge else str(drop)
        with torch.no_grad():
            expected = (
                forward_merging(model, images, merge)
                if merge
                else model.forward_dropping(images, num_keep(n, drop), select_block)
            )
        got = session.run(None, graph_feed(session, images.numpy(), drop))[0]
        diffs[setting] = float(np.abs(got - expected.numpy()).max())
        if diffs[setting] > tolerance:
            raise LotusError(
                f"ONNX Runtime differs from PyTorch by {diffs[setting]:.2e} at {'merge ' if merge else 'drop '}{setting} "
                f"(tolerance {tolerance:g}): the export is not faithful and was not written"
            )
    return diffs


def accuracy_onnx(path: Path, images: torch.Tensor, labels: torch.Tensor, drop: float = 0.0, batch_size: int = 256) -> float:
    session = ort_session(path)
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = session.run(None, graph_feed(session, images[i : i + batch_size].numpy(), drop))[0]
        correct += int((logits.argmax(-1) == labels[i : i + batch_size].numpy()).sum())
    return 100.0 * correct / len(images)


KEEP_IDX_OUTPUT = "keep_idx"


def keep_idx_session(path: str | Path):
    """An ONNX Runtime session of a drop-by-attention graph (`model.onnx`, fp32 or int8) with a
    second output `keep_idx` int64 [B, K]: the patch indices its select block keeps (the output
    of its one TopK), in descending order of attention. The file is left as it is."""
    import onnx

    model = onnx.load(str(path))
    topk = [node for node in model.graph.node if node.op_type == "TopK"]
    if len(topk) != 1:
        raise LotusError(
            f"{path} has {len(topk)} TopK nodes, not the one that picks the kept patches: "
            "pass a model.onnx written by `lotus export onnx` (not its keep-index twin)"
        )
    model.graph.node.append(onnx.helper.make_node("Identity", [topk[0].output[1]], [KEEP_IDX_OUTPUT]))
    model.graph.output.append(onnx.helper.make_tensor_value_info(KEEP_IDX_OUTPUT, onnx.TensorProto.INT64, None))
    return ort_session(model.SerializeToString())


def exported_keep_idx(path: str | Path, images: torch.Tensor, drop: float, batch_size: int = 256) -> torch.Tensor:
    """(B, K) int64: the patches the exported graph `path` keeps of each image at `drop`, as ONNX
    Runtime runs it.

    Args:
        images: (B, 3, S, S) uint8 at the model's input size; normalised here with the mean and
            std of the graph's metadata.
    """
    meta = lotus_metadata(path, ("mean", "std"))
    mean = torch.tensor(json.loads(meta["mean"])).view(1, 3, 1, 1) * 255
    std = torch.tensor(json.loads(meta["std"])).view(1, 3, 1, 1) * 255
    session = keep_idx_session(path)
    kept = []
    for chunk in images.split(batch_size):
        pixels = ((chunk.float() - mean) / std).numpy()
        feeds = {"pixel_values": pixels, "drop": np.array(drop, dtype=np.float32)}
        kept.append(torch.from_numpy(session.run([KEEP_IDX_OUTPUT], feeds)[0]))
    return torch.cat(kept)


def exported_coverage(path: str | Path, images: torch.Tensor, boxes: ImageBoxes, drop: float) -> dict[str, Any]:
    """The object coverage (`lotus.coverage.selection_coverage`) of the patches the exported graph
    `path` keeps at `drop`: the share of kept patches that touch the object box and the share
    of the box's patches kept, averaged over the images.

    Args:
        images: (M, 3, S, S) uint8 images at the model's input size, those of `boxes` in the
            order of `boxes.index` (e.g. `data.images[boxes.index]`).
        boxes: their object boxes (`lotus.coverage.match_boxes`).
    """
    meta = lotus_metadata(path, ("img_size", "patch_size"))
    patch_size = int(meta["patch_size"])
    keep_idx = exported_keep_idx(path, images, drop)
    return selection_coverage(keep_idx, boxes, int(meta["img_size"]) // patch_size, patch_size)


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of the weights with ONNX Runtime's tools: signed, per output
    channel (unsigned weights bring no speed on AVX-512 VNNI CPUs), after the shape inference
    and graph clean-up ONNX Runtime recommends before quantising.

    The patch embedding (the one Conv) stays fp32: ONNX Runtime's ConvInteger is slow on CPUs,
    17.6% of a 64 px, 8x8-patch stacked graph's time at drop 0.7, and dropping or pruning never
    shrink it; kept fp32, that graph ran in 0.225x of dense fp32 instead of 0.273x."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(dst.stem + ".prep.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    ops = [op for op in IntegerOpsRegistry if op != "Conv"]
    quantize_dynamic(str(prepared), str(dst), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    prepared.unlink()
    return dst


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    data_cfg: DataConfig | None,
    cfg: ExportConfig = ExportConfig(),
    *,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Export a LOTUS checkpoint (or run folder) to `out` (and its keep-index twin), verified.

    Nothing is written under `out`'s names unless every check passed: the graphs are built in a
    temporary folder beside `out` and moved into place at the end.

    Args:
        data_cfg: the dataset whose test images verification, the int8 accuracy and the object
            coverage (`cfg.boxes`) use (None skips the first two; the checkpoint's own dataset is
            the usual choice).
    """
    _check_config(cfg, data_cfg)
    model, meta = load_model(checkpoint)
    model.float().eval()
    select_block = _select_block(cfg, len(model.blocks), meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "select_block": None if cfg.merge else select_block,
        "num_patches": model.patch_embed.num_patches,
    }
    needs_data = data_cfg is not None and (cfg.verify or cfg.quantize or cfg.boxes)
    data = load_split_for_model(data_cfg, meta["preprocess"], "test") if needs_data else None
    boxes = match_boxes(cfg.boxes, data) if cfg.boxes else None  # a wrong boxes file fails before the export
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        main, keep = _write_graphs(model, cfg, select_block, meta["preprocess"]["img_size"], Path(tmp), log)
        report.update(check_exported_sparsity(main, model, prunable_names(model)))
        images, labels = (
            eval_images(data, meta["preprocess"]) if data is not None and (cfg.verify or cfg.quantize) else (None, None)
        )
        if cfg.verify:
            settings = f"merge r {cfg.merge}" if cfg.merge else f"drop {', '.join(map(str, VERIFY_DROPS))}"
            log(f"verifying against PyTorch on {min(cfg.verify_images, len(images))} eval images at {settings}")
            report["max_abs_diff"] = verify(main, model, images[: cfg.verify_images], select_block, cfg.tolerance, cfg.merge)
        if cfg.quantize == "int8":
            main, keep = _quantize(main, keep, images, labels, report, log)
        props = _metadata(meta, model, select_block, {"quantize": cfg.quantize or "none", **_merging_metadata(cfg.merge)})
        _set_metadata(main, props)
        if boxes is not None:
            report["object_coverage"] = _coverage_by_drop(main, data, boxes, log)
        if keep is not None:
            _set_metadata(
                keep, {**props, "inputs": "pixel_values float32 [B,3,H,W] normalised; keep_idx int64 [B,K] patch indices"}
            )
            os.replace(keep, keep_idx_path(out))
            report["keep_idx_path"] = str(keep_idx_path(out))
        os.replace(main, out)
    report.update({"path": str(out), "bytes": out.stat().st_size})
    return report


def _write_graphs(
    model: TokenGatherViT, cfg: ExportConfig, select_block: int, img_size: int, folder: Path, log: Callable[[str], None]
) -> tuple[Path, Path | None]:
    """The graphs `cfg` asks for, in `folder`: dropping and its keep-index twin, or merging alone."""
    if cfg.merge:
        log(f"exporting the token-merging graph: {cfg.merge} tokens merged per block")
        return export_merging(model, cfg.merge, folder / "model.onnx", cfg.opset), None
    return _export_graphs(model, select_block, img_size, cfg.opset, folder, log)


def _check_config(cfg: ExportConfig, data_cfg: DataConfig | None) -> None:
    if cfg.quantize not in (None, "int8"):
        raise LotusError(f"--quantize {cfg.quantize!r} is not supported: use int8")
    if cfg.verify and data_cfg is None:
        raise LotusError("verification needs eval images: pass --data, or --no-verify to skip it")
    if cfg.boxes and data_cfg is None:
        raise LotusError("--boxes measures the graph on eval images: pass --data")
    if cfg.merge < 0:
        raise LotusError(f"--merge {cfg.merge} is negative: give the tokens merged per block (ToMe's r), e.g. 4")
    if cfg.merge and cfg.boxes:
        raise LotusError("--boxes measures the patches a dropping graph keeps; a merging graph (--merge) reads every patch")
    if cfg.merge and cfg.select_block is not None:
        raise LotusError("--select-block picks the patches a dropping graph keeps; a merging graph (--merge) drops none")


def _merging_metadata(merge: int) -> dict[str, Any]:
    """What a merging graph's metadata says instead of the dropping graph's (nothing when `merge` is 0)."""
    if not merge:
        return {}
    return {
        "merge_per_block": merge,
        "select_block": "none",
        "inputs": "pixel_values float32 [B,3,H,W] normalised (x/255 - mean) / std; no drop input (tokens merged, ToMe)",
    }


def _coverage_by_drop(path: Path, data: ImageData, boxes: ImageBoxes, log: Callable[[str], None]) -> dict[str, Any]:
    """{drop: object coverage} of the graph's kept patches on the test images with a box, at the
    verification's drop ratios above 0 (at 0 every patch is kept)."""
    drops = [drop for drop in VERIFY_DROPS if drop > 0]
    log(f"measuring object coverage on {len(boxes.index)} eval images with a box at drop {', '.join(map(str, drops))}")
    images = data.take(boxes.index).images
    return {str(drop): exported_coverage(path, images, boxes, drop) for drop in drops}


def _select_block(cfg: ExportConfig, depth: int, meta: dict[str, Any]) -> int:
    """The block whose class-token attention picks the kept patches: `cfg`'s; else the one the
    model was trained drop-aware with, so it is served as it was trained; else depth // 6."""
    trained = meta.get("train") or {}
    if cfg.select_block is None and trained.get("drop_aware") and trained.get("select_block") is not None:
        return select_block_of(depth, trained["select_block"])
    return select_block_of(depth, cfg.select_block)


def _export_graphs(
    model: TokenGatherViT, select_block: int, img_size: int, opset: int, folder: Path, log: Callable[[str], None]
) -> tuple[Path, Path]:
    """Export the drop-by-attention graph and the keep-index graph into `folder`, both with a
    dynamic batch axis (and a dynamic K for keep_idx); returns their paths."""
    main, keep = folder / "model.onnx", folder / "model_keep_idx.onnx"
    example = torch.randn(2, 3, img_size, img_size)
    n = model.patch_embed.num_patches
    batch = torch.export.Dim("batch", min=1, max=4096)
    log("exporting the drop-by-attention graph")
    _export(
        DropByAttention(model, select_block),
        (example, torch.tensor(0.0)),
        ["pixel_values", "drop"],
        ({0: batch}, None),
        opset,
        main,
    )
    log("exporting the keep-index graph")
    keep_idx = torch.stack([torch.randperm(n)[: n // 2] for _ in range(2)])
    num_keep_dim = torch.export.Dim("num_keep", min=1, max=n)
    _export(
        KeepIndices(model),
        (example, keep_idx),
        ["pixel_values", "keep_idx"],
        ({0: batch}, {0: batch, 1: num_keep_dim}),
        opset,
        keep,
    )
    return main, keep


def export_merging(model: TokenGatherViT, merge_per_block: int, path: str | Path, opset: int = 18) -> Path:
    """Export token merging (`lotus.merge`, ToMe) at a fixed `merge_per_block` to `path`: input
    `pixel_values` float32 [B, 3, H, W] (dynamic batch), output `logits`.

    The merge itself is gather and scatter-add (ONNX ScatterElements with reduction 'add'), and
    the sort of the matching a TopK. Attention is traced with PyTorch's math kernel: its logit
    bias (proportional attention) makes the CPU's fused kernel trace to a reshape the exporter
    cannot decompose. The weights are those of `model`, unchanged.
    """
    path = Path(path)
    size = model.patch_embed.img_size
    example = torch.randn(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with sdpa_kernel([SDPBackend.MATH]):
        _export(TokenMerging(model, merge_per_block), (example,), ["pixel_values"], ({0: batch},), opset, path)
    props = {
        "lotus_version": lotus.__version__,
        "img_size": str(size[0]),
        "patch_size": str(model.patch_embed.patch_size[0]),
        "num_patches": str(model.patch_embed.num_patches),
        "merge_per_block": str(merge_per_block),
        "inputs": "pixel_values float32 [B,3,H,W] normalised",
    }
    _set_metadata(path, props)
    return path


def _quantize(
    main: Path,
    keep: Path | None,
    images: torch.Tensor | None,
    labels: torch.Tensor | None,
    report: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[Path, Path | None]:
    """int8 versions of both graphs, beside them; with eval images, the accuracy before and after
    goes into `report`. Returns the int8 graphs' paths (`keep` None: a merging graph, no twin)."""
    log("quantizing weights to int8 (dynamic, per channel, signed)")
    main_int8 = quantize_int8(main, main.with_name("model.int8.onnx"))
    keep_int8 = quantize_int8(keep, keep.with_name("keep.int8.onnx")) if keep is not None else None
    if images is not None:
        report["fp32_accuracy"] = accuracy_onnx(main, images, labels)
        report["int8_accuracy"] = accuracy_onnx(main_int8, images, labels)
        if keep is not None:  # a dropping graph
            report["int8_accuracy_drop_0.5"] = accuracy_onnx(main_int8, images, labels, drop=0.5)
        report["accuracy_split"] = "test"  # of the three figures above: reports, nothing is chosen by them
    return main_int8, keep_int8
