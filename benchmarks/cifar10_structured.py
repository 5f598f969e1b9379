"""Structured pruning on CIFAR-10 (../shared): heads and MLP neurons removed for real.

From the baseline checkpoint (benchmarks/cifar10_baseline.py):
1. `prune_structured` removes one head in three and half of every MLP, once per importance
   score (magnitude, activation, Taylor: their accuracy before fine-tuning is compared), and an
   unstructured one-shot magnitude model with the same number of non-zero parameters is made
   beside it. The `--importance` one goes on.
2. Both, and the dense model, are exported to ONNX (the shrunk one also as int8); file sizes and
   ONNX Runtime CPU latency at batch 64 are measured side by side: every model in turn, for
   several rounds, a fresh session each time, the median of the rounds' medians kept.
3. With --finetune-epochs E > 0, both pruned models are fine-tuned for E epochs at the same
   budget (resumable; each finished run is saved and skipped next time) and their accuracy
   recorded per epoch; the fine-tuned shrunk model is exported again (fp32 and int8) and its
   ONNX accuracy measured at drop 0 and 0.5.

    python benchmarks/cifar10_structured.py --finetune-epochs 0     # sizes and latency only
    python benchmarks/cifar10_structured.py --finetune-epochs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import RESULTS, ROOT, SHARED_CIFAR, cifar10_folder, write_result

from lotus.bench import LocalBenchConfig, bench_local
from lotus.checkpoint import load_model
from lotus.data import DataConfig, load_split_for_model
from lotus.export import ExportConfig, accuracy_onnx, eval_images, export_onnx
from lotus.masks import prunable_names
from lotus.prune import PruneConfig, prune_oneshot, prune_structured
from lotus.structured import StructuredConfig
from lotus.train import TrainConfig, default_configs, train
from lotus.vit import ModelConfig, count_parameters

OUT = RESULTS / "cifar10_structured"


def latency_rounds(models: dict[str, tuple[Path, float]], batch: int, runs: int, rounds: int) -> dict[str, dict]:
    """Median latency of each (model, drop) at `batch`, the models taking turns for `rounds` rounds."""
    medians: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name, (path, drop) in models.items():
            cell = bench_local(path, LocalBenchConfig(batch_sizes=(batch,), drops=(drop,), runs=runs, warmup=3))["cells"][0]
            medians[name].append(cell["median_ms"])
        print(f"round {r + 1}: " + ", ".join(f"{n} {m[-1]:.1f} ms" for n, m in medians.items()), flush=True)
    return {name: {"median_ms": statistics.median(m), "round_medians_ms": m} for name, m in medians.items()}


def finetune(name: str, checkpoint: Path, data_cfg: DataConfig, cfg: TrainConfig, work: Path) -> dict:
    """Fine-tune `checkpoint` for `cfg.epochs` (resumable), saved as OUT/finetune-<name>-epochs<E>.json."""
    path = OUT / f"finetune-{name}-epochs{cfg.epochs}.json"
    if path.exists():
        print(f"{name}: already fine-tuned ({path})")
        return json.loads(path.read_text())
    start = time.perf_counter()
    history = train(data_cfg, ModelConfig(), cfg, work / f"ft-{name}-epochs{cfg.epochs}", init_checkpoint=checkpoint, resume=True)
    result = {
        "run": name,
        "checkpoint": str(checkpoint),
        "train": cfg.__dict__,
        "history": history,
        "wall_seconds": time.perf_counter() - start,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def finetune_both(shrunk: Path, unstructured: Path, data_cfg: DataConfig, epochs: int, work: Path) -> dict[str, dict]:
    """The shrunk and the unstructured model fine-tuned at the same budget: the CIFAR-10 recipe at half its learning rate."""
    _, _, baseline_cfg = default_configs("cifar10")
    ft_cfg = TrainConfig(**{**baseline_cfg.__dict__, "epochs": epochs, "lr": baseline_cfg.lr / 2, "warmup_epochs": 0.5})
    return {
        name: finetune(name, ckpt, data_cfg, ft_cfg, work) for name, ckpt in (("shrunk", shrunk), ("unstructured", unstructured))
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs" / "bench-cifar10-baseline")
    p.add_argument("--heads", type=float, default=1 / 3, help="fraction of each block's heads removed")
    p.add_argument("--mlp", type=float, default=0.5, help="fraction of each block's MLP neurons removed")
    p.add_argument("--importance", default="taylor", help="the importance score of the shrunk model that goes on")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=20, help="timed runs per model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--select-block", type=int, default=None, help="export with this select block (default: the exporter's)")
    p.add_argument(
        "--prepare-only", action="store_true", help="prune and export, then stop (time latency later, on an idle machine)"
    )
    p.add_argument(
        "--accuracy-only",
        action="store_true",
        help="prune and fine-tune only: no ONNX export or latency (e.g. on a GPU machine, whose CPU latency is not the one reported)",
    )
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-cifar10-structured")
    args = p.parse_args()
    data_cfg = DataConfig(str(cifar10_folder(args.archive)))
    work = args.work

    importance_accuracy = {}
    for importance in ("magnitude", "activation", "taylor"):
        folder = work / f"shrunk-{importance}"
        if not (folder / "structured.json").exists():
            prune_structured(
                args.baseline, folder, StructuredConfig(heads=args.heads, mlp=args.mlp, importance=importance), data_cfg=data_cfg
            )
        importance_accuracy[importance] = json.loads((folder / "structured.json").read_text())["accuracy"]
    print(f"accuracy after shrinking, before fine-tuning: {importance_accuracy}")
    shrunk = work / f"shrunk-{args.importance}"
    structured = json.loads((shrunk / "structured.json").read_text())
    dense_model, _ = load_model(args.baseline)
    prunable = sum(dict(dense_model.named_parameters())[n].numel() for n in prunable_names(dense_model))
    removed = structured["parameters"]["before"] - structured["parameters"]["after"]
    sparsity = removed / prunable  # zeros that leave as many non-zero parameters as the shrunk model has
    unstructured = work / "unstructured"
    if not (unstructured / "model.json").exists():
        prune_oneshot(args.baseline, sparsity, unstructured, PruneConfig(), data_cfg=data_cfg)
    unstructured_acc = json.loads((unstructured / "model.json").read_text())["accuracy"]

    result = {
        "baseline": str(args.baseline),
        "structured": {k: v for k, v in structured.items() if k != "keep"},
        "unstructured_sparsity": sparsity,
        "parameters": {
            "dense": count_parameters(dense_model),
            "shrunk": structured["parameters"]["after"],
            "unstructured_nonzero": count_parameters(dense_model) - round(sparsity * prunable),
        },
        "accuracy_before_finetune": {
            "dense": json.loads((args.baseline / "model.json").read_text())["metrics"]["test_accuracy"],
            "shrunk": structured["accuracy"],
            "unstructured": unstructured_acc,
        },
        "importance": args.importance,
        "shrunk_accuracy_by_importance": importance_accuracy,
    }
    if args.accuracy_only:
        if args.finetune_epochs > 0:
            runs = finetune_both(shrunk, unstructured, data_cfg, args.finetune_epochs, work)
            result["finetune"] = {name: [h["test_accuracy"] for h in r["history"]] for name, r in runs.items()}
        write_result("cifar10_structured_accuracy", result)
        return print(json.dumps({k: result.get(k) for k in ("parameters", "accuracy_before_finetune", "finetune")}, indent=1))

    tag = "" if args.select_block is None else f".select{args.select_block}"
    onnx = {
        "dense": (args.baseline, work / "dense.onnx", None),
        "unstructured": (unstructured, work / "unstructured.onnx", None),
        "shrunk": (shrunk, work / f"{shrunk.name}{tag}.onnx", None),
        "shrunk_int8": (shrunk, work / f"{shrunk.name}{tag}.int8.onnx", "int8"),
    }
    for ckpt, path, quantize in onnx.values():
        if not path.exists():
            export_onnx(ckpt, path, data_cfg, ExportConfig(quantize=quantize, verify_images=32, select_block=args.select_block))
    sizes = {name: path.stat().st_size for name, (_, path, _) in onnx.items()}
    if args.prepare_only:
        return print(f"prepared: {', '.join(str(path) for _, path, _ in onnx.values())}")

    latency = latency_rounds(
        {
            "dense": (work / "dense.onnx", 0.0),
            "shrunk": (onnx["shrunk"][1], 0.0),
            "shrunk_drop0.5": (onnx["shrunk"][1], 0.5),
            "shrunk_int8_drop0.5": (onnx["shrunk_int8"][1], 0.5),
        },
        args.batch,
        args.runs,
        args.rounds,
    )
    for cell in latency.values():  # the median of the rounds' ratios: each round's models ran minutes apart, not hours
        cell["vs_dense_fp32"] = statistics.median(
            m / d for m, d in zip(cell["round_medians_ms"], latency["dense"]["round_medians_ms"])
        )

    result.update(
        {
            "onnx_bytes": sizes,
            "size_vs_dense": {n: s / sizes["dense"] for n, s in sizes.items()},
            "latency_batch": args.batch,
            "latency": latency,
            "select_block": args.select_block,
        }
    )
    if args.finetune_epochs > 0:
        runs = finetune_both(shrunk, unstructured, data_cfg, args.finetune_epochs, work)
        result["finetune"] = {name: [h["test_accuracy"] for h in r["history"]] for name, r in runs.items()}
        tuned = work / f"ft-shrunk-epochs{args.finetune_epochs}"
        images, labels = None, None
        result["finetuned_shrunk_onnx"] = {}
        for quantize in (None, "int8"):
            path = work / f"ft-shrunk.{quantize or 'fp32'}.onnx"
            if not path.exists():
                export_onnx(tuned, path, data_cfg, ExportConfig(quantize=quantize, verify_images=32))
            if images is None:
                pre = load_model(tuned)[1]["preprocess"]
                images, labels = eval_images(load_split_for_model(data_cfg, pre, "test"), pre)
            result["finetuned_shrunk_onnx"][quantize or "fp32"] = {
                f"drop{d:g}": accuracy_onnx(path, images, labels, drop=d) for d in (0.0, 0.5)
            }
    write_result("cifar10_structured" + tag.replace(".", "_"), result)
    print(json.dumps({k: result[k] for k in ("parameters", "accuracy_before_finetune", "size_vs_dense")}, indent=1))
    for name, cell in latency.items():
        print(f"{name:>22}: {cell['median_ms']:8.1f} ms at batch {args.batch}, x{cell['vs_dense_fp32']:.3f} of dense fp32")
    if "finetune" in result:
        print("fine-tune accuracy per epoch:", json.dumps(result["finetune"]))
        print("fine-tuned shrunk ONNX accuracy:", json.dumps(result["finetuned_shrunk_onnx"]))


if __name__ == "__main__":
    main()
