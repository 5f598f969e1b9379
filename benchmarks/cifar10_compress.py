"""`lotus compress` on CIFAR-10 (../shared) from the baseline checkpoint, at a stated budget.

Runs the pipeline at the settings given (for example sparsity 0.3 with drop 0.1, and
sparsity 'auto' with ISP to 0.5 and drop 0.3), writes the run folder under runs/ and a summary
to benchmarks/results/cifar10_compress_<name>.json; then exports the compressed model to ONNX
(fp32 and int8), measures its accuracy at drop 0, 0.1, 0.3, 0.5 on the whole test split and its
ONNX Runtime latency (batch 1 and 64) with `lotus bench --local`'s code.

    python benchmarks/cifar10_compress.py --name s0.3-d0.1 --sparsity 0.3 --drop 0.1 --epochs 1
    python benchmarks/cifar10_compress.py --name auto-isp0.5-d0.3 --sparsity auto --isp-target 0.5 --drop 0.3 --epochs 1
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

from common import ROOT, SHARED_CIFAR, cifar10_folder, write_result

from lotus.bench import LocalBenchConfig, bench_local
from lotus.checkpoint import load_model
from lotus.data import DataConfig, load_split_for_model
from lotus.export import ExportConfig, accuracy_onnx, eval_images, export_onnx
from lotus.masks import nm_pattern
from lotus.pipeline import compress, default_compress_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs" / "bench-cifar10-baseline")
    p.add_argument("--sparsity", default="0.3", help="a fraction, 'auto', or '2:4'")
    p.add_argument("--drop", type=float, default=0.1)
    p.add_argument("--isp-target", type=float, default=None)
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR)
    p.add_argument("--runs", type=int, default=50, help="latency runs per cell")
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--select-block", type=int, default=None, help="export with this select block (default: the exporter's)")
    args = p.parse_args()

    data_cfg = DataConfig(str(cifar10_folder(args.archive)))
    cfg = default_compress_config(data_cfg.name)
    cfg = replace(
        cfg,
        data=data_cfg,
        checkpoint=str(args.baseline),
        sparsity=args.sparsity if args.sparsity == "auto" or nm_pattern(args.sparsity) else float(args.sparsity),
        tickets=replace(cfg.tickets, drop=args.drop),
        isp_target=args.isp_target,
        finetune=replace(cfg.finetune, epochs=args.epochs, warmup_epochs=min(0.5, args.epochs / 4)),
    )
    run = ROOT / "runs" / f"bench-cifar10-compress-{args.name}"
    start = time.perf_counter()
    metrics = compress(cfg, run, resume=True)
    result = {
        "name": args.name,
        "recipe": asdict(cfg),
        "run": str(run),
        "wall_seconds": time.perf_counter() - start,
        "metrics": metrics,
    }

    if not args.skip_export:
        model, meta = load_model(run)
        images, labels = eval_images(load_split_for_model(data_cfg, meta["preprocess"], "test"), meta["preprocess"])
        exports = {}
        tag = "" if args.select_block is None else f".select{args.select_block}"
        for quantize in (None, "int8"):
            out = run / (f"model{tag}.int8.onnx" if quantize else f"model{tag}.onnx")
            report = export_onnx(run, out, data_cfg, ExportConfig(quantize=quantize, select_block=args.select_block))
            accuracy = {str(d): accuracy_onnx(out, images, labels, drop=d) for d in (0.0, 0.1, 0.3, 0.5)}
            latency = bench_local(out, LocalBenchConfig(runs=args.runs))
            exports[quantize or "fp32"] = {
                "bytes": report["bytes"],
                "accuracy": accuracy,
                "latency": latency["cells"],
                "max_abs_diff": report.get("max_abs_diff"),
                "select_block": report["select_block"],
            }
            print(f"{quantize or 'fp32'}: {report['bytes'] / 1e6:.1f} MB, accuracy by drop {accuracy}")
            for c in latency["cells"]:
                print(f"  batch {c['batch']:>3} drop {c['drop']:<4} median {c['median_ms']:8.2f} ms  x drop0 {c['vs_drop0']:.3f}")
        result["onnx"] = exports
    write_result(f"cifar10_compress_{args.name}" + ("" if args.select_block is None else f"_select{args.select_block}"), result)
    print({k: metrics[k] for k in ("dense_accuracy", "compressed_accuracy", "sparsity", "drop", "essential_sparsity")})


if __name__ == "__main__":
    main()
