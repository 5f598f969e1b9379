"""`lotus export`: a LOTUS model in a deployable format: ONNX, and a Triton model repository built on it."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataDirOpt, coverage_line, data_config, err, log, parse_floats, path_or_latest_run, user_errors

app = typer.Typer(help="Export a LOTUS model for deployment: ONNX, or a Triton model repository.", no_args_is_help=True)

SourceArg = Annotated[Path | None, typer.Argument(help="Run folder or checkpoint (default: the latest run).")]
OnnxOutOpt = Annotated[
    Path | None, typer.Option(help="ONNX file (default: SOURCE_RUN/model.onnx; the keep-index graph goes beside it).")
]
QuantizeOpt = Annotated[str | None, typer.Option(help="'int8': dynamic per-channel signed int8 weights.")]
OpsetOpt = Annotated[int, typer.Option(help="ONNX opset.")]
SelectBlockOpt = Annotated[
    int | None,
    typer.Option(help="Block whose class-token attention picks the kept patches (default: depth // 6, block 2 of 12)."),
]
VerifyOpt = Annotated[
    bool, typer.Option(help="Check ONNX Runtime against PyTorch on eval images at drop 0, 0.1, 0.3, 0.5 (fails above 1e-4).")
]
BoxesOpt = Annotated[
    Path | None,
    typer.Option(
        help="The eval data's boxes.tsv: report how much of each test image's object box the graph keeps at drop 0.1, 0.3 and 0.5 (object_coverage)."
    ),
]
MergeOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="ToMe's r: export token merging instead of patch dropping, r tokens merged after each block "
        "(no drop input, no keep-index graph; default out SOURCE_RUN/model.tome-rR.onnx). 0: patch dropping.",
    ),
]
EvalDataOpt = Annotated[
    str | None, typer.Option("--data", help="Dataset of the eval images (default: the one the model was trained on).")
]


@app.command("onnx")
@user_errors
def export_onnx(
    source: SourceArg = None,
    out: OnnxOutOpt = None,
    quantize: QuantizeOpt = None,
    opset: OpsetOpt = 18,
    select_block: SelectBlockOpt = None,
    verify: VerifyOpt = True,
    boxes: BoxesOpt = None,
    merge: MergeOpt = 0,
    data: EvalDataOpt = None,
    data_dir: DataDirOpt = Path("data"),
) -> None:
    """Export to ONNX: dynamic batch, patch dropping (or token merging) inside the graph, metadata, verified against PyTorch."""
    from lotus.checkpoint import load_checkpoint
    from lotus.export import ExportConfig
    from lotus.export import export_onnx as export_run
    from lotus.settings import check_boxes

    source = path_or_latest_run(source)
    if out is None:
        run_dir = source if source.is_dir() else source.parent
        suffix = (f".tome-r{merge}" if merge else "") + (".int8" if quantize == "int8" else "")
        out = run_dir / f"model{suffix}.onnx"
    _, meta = load_checkpoint(source)
    dataset = data or (meta.get("data") or {}).get("name") or meta["preprocess"].get("dataset")
    cfg = ExportConfig(
        opset=opset,
        select_block=select_block,
        verify=verify,
        quantize=quantize,
        boxes=str(boxes) if boxes else None,
        merge=merge,
    )
    data_cfg = data_config(dataset, data_dir) if dataset else None
    if data_cfg is not None:
        check_boxes(data_cfg, cfg.boxes)
    report = export_run(source, out, data_cfg, cfg, log=log)
    print(json.dumps(report))
    twin = f" and {report['keep_idx_path']}" if "keep_idx_path" in report else ""
    err.print(f"exported {out} ({report['bytes'] / 1e6:.1f} MB){twin}")
    for drop, coverage in report.get("object_coverage", {}).items():
        err.print(f"drop {drop}: {coverage_line(coverage)}")


class TritonDevice(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


TritonSourceArg = Annotated[
    Path | None,
    typer.Argument(help="Run folder (its model.onnx) or a model.onnx of `lotus export onnx` (default: the latest run's)."),
]
RepositoryOpt = Annotated[Path | None, typer.Option("--out", help="Triton model repository folder (default: SOURCE_RUN/triton).")]
NameOpt = Annotated[str, typer.Option(help="Model name prefix: the repository holds NAME_dropR for each drop ratio R.")]
TritonDropsOpt = Annotated[
    str,
    typer.Option(
        "--drop",
        help="Comma-separated drop ratios, one Triton model each with the ratio fixed in its graph, "
        "so a batch never mixes ratios; a client picks the ratio by the model name. "
        "A token-merging graph (--merge) is one model, NAME_tome-rR: --drop does not apply.",
    ),
]
MaxBatchSizeOpt = Annotated[int, typer.Option(min=1, help="Most images in one model call (Triton's max_batch_size).")]
MaxQueueDelayOpt = Annotated[
    int, typer.Option(min=0, help="Longest a request waits for others to join its batch, in microseconds.")
]
PreferredBatchOpt = Annotated[
    str | None,
    typer.Option(help="Comma-separated batch sizes the dynamic batcher aims for (default: none, batches as large as it can)."),
]
TritonDeviceOpt = Annotated[TritonDevice, typer.Option(help="Where the model instances run: cpu or gpu (every visible GPU).")]
InstancesOpt = Annotated[int, typer.Option(min=1, help="Model instances per device, each running one batch at a time.")]
TritonThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads per instance (default: its own choice, all cores).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace repository entries of the same names (other models stay).")]


@app.command("triton")
@user_errors
def export_triton(
    source: TritonSourceArg = None,
    out: RepositoryOpt = None,
    name: NameOpt = "lotus",
    drop: TritonDropsOpt = "0,0.1,0.3,0.5",
    max_batch_size: MaxBatchSizeOpt = 32,
    max_queue_delay_us: MaxQueueDelayOpt = 2000,
    preferred_batch_sizes: PreferredBatchOpt = None,
    device: TritonDeviceOpt = TritonDevice.cpu,
    instances: InstancesOpt = 1,
    threads: TritonThreadsOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write a Triton Inference Server model repository (one model per drop ratio) and a KServe InferenceService for it."""
    from lotus.triton import TritonConfig
    from lotus.triton import export_triton as export_repository

    source = path_or_latest_run(source, containing="model.onnx")
    if source.is_dir():
        source = source / "model.onnx"
    preferred = (
        tuple(int(b) for b in parse_floats(preferred_batch_sizes, "--preferred-batch-sizes")) if preferred_batch_sizes else ()
    )
    cfg = TritonConfig(
        name=name,
        drops=parse_floats(drop, "--drop"),
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=preferred,
        device=device.value,
        instances=instances,
        threads=threads,
        force=force,
    )
    report = export_repository(source, out or source.parent / "triton", cfg, log=log)
    print(json.dumps(report))
    err.print(f"wrote {len(report['models'])} Triton models to {report['repository']} and {report['inference_service']}")
