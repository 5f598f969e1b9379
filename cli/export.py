"""`lotus export`: a LOTUS model in a deployable format (today ONNX)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataDirOpt, coverage_line, data_config, err, log, path_or_latest_run, user_errors

app = typer.Typer(help="Export a LOTUS model for deployment.", no_args_is_help=True)

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
    data: EvalDataOpt = None,
    data_dir: DataDirOpt = Path("data"),
) -> None:
    """Export to ONNX: dynamic batch, patch dropping inside the graph, metadata, verified against PyTorch."""
    from lotus.checkpoint import load_checkpoint
    from lotus.export import ExportConfig
    from lotus.export import export_onnx as export_run
    from lotus.settings import check_boxes

    source = path_or_latest_run(source)
    if out is None:
        run_dir = source if source.is_dir() else source.parent
        out = run_dir / ("model.int8.onnx" if quantize == "int8" else "model.onnx")
    _, meta = load_checkpoint(source)
    dataset = data or (meta.get("data") or {}).get("name") or meta["preprocess"].get("dataset")
    cfg = ExportConfig(
        opset=opset, select_block=select_block, verify=verify, quantize=quantize, boxes=str(boxes) if boxes else None
    )
    data_cfg = data_config(dataset, data_dir) if dataset else None
    if data_cfg is not None:
        check_boxes(data_cfg, cfg.boxes)
    report = export_run(source, out, data_cfg, cfg, log=log)
    print(json.dumps(report))
    err.print(f"exported {out} ({report['bytes'] / 1e6:.1f} MB) and {report['keep_idx_path']}")
    for drop, coverage in report.get("object_coverage", {}).items():
        err.print(f"drop {drop}: {coverage_line(coverage)}")
