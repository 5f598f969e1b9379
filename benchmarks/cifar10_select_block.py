"""Which block should choose the patches at inference? Accuracy and latency against select block.

The exported graph runs the blocks before `select_block` on every patch, scores the patches with
that block's class-token attention, and runs the rest on the kept ones. An earlier block is
cheaper (fewer blocks see every patch) and a worse judge (less context). This measures both on
a CIFAR-10 checkpoint (by default the frontier's dense model, `benchmarks/frontier.py`):

- accuracy (PyTorch `forward_dropping`, which the ONNX graph matches within 1e-4) on the whole
  test split, at each select block and drop ratio;
- ONNX Runtime CPU latency at batch 1 and 64, every (select block, drop) graph taking turns for
  several rounds (the median of the rounds' medians kept).

Accuracy can run on a busy machine; latency wants an idle one (`--part latency` alone).

    python benchmarks/cifar10_select_block.py --checkpoint runs/frontier/cifar10/ft-dense

The graphs go beside the checkpoint (`RUN-select-block/`); a result of another checkpoint is replaced.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import RESULTS, ROOT, SHARED_CIFAR, cifar10_folder, machine, shown

from lotus.bench import LocalBenchConfig, bench_local
from lotus.checkpoint import load_model
from lotus.data import BatchLoader, DataConfig, load_split_for_model
from lotus.drop import select_block_of
from lotus.export import ExportConfig, export_onnx

OUT = RESULTS / "cifar10_select_block.json"


@torch.inference_mode()
def accuracy_grid(model, pre: dict, data_cfg: DataConfig, blocks: list[int], drops: list[float]) -> dict[str, float]:
    data = load_split_for_model(data_cfg, pre, "test")
    n = model.patch_embed.num_patches
    correct = {"dense": 0}
    for batch in BatchLoader(data, 500, pre["mean"], pre["std"]).epoch():
        correct["dense"] += int((model(batch.images).argmax(1) == batch.labels).sum())
        for s in blocks:
            for drop in drops:
                key = f"s{s}-d{drop:g}"
                logits = model.forward_dropping(batch.images, n - round(drop * n), s)
                correct[key] = correct.get(key, 0) + int((logits.argmax(1) == batch.labels).sum())
    return {k: 100.0 * v / len(data) for k, v in correct.items()}


def export_graphs(checkpoint: Path, work: Path, blocks: list[int]) -> dict[int, Path]:
    """One ONNX graph per select block (the export tests check such graphs against PyTorch)."""
    graphs = {}
    for s in blocks:
        graphs[s] = work / f"select{s}.onnx"
        if not graphs[s].exists():
            export_onnx(checkpoint, graphs[s], None, ExportConfig(select_block=s, verify=False))
    return graphs


def latency_grid(graphs: dict[int, Path], drops: list[float], batches: list[int], runs: int, rounds: int) -> dict[str, dict]:
    cells: dict[str, list[float]] = {}
    for r in range(rounds):
        for s, path in graphs.items():
            result = bench_local(path, LocalBenchConfig(batch_sizes=tuple(batches), drops=(0.0, *drops), runs=runs, warmup=3))
            for c in result["cells"]:
                cells.setdefault(f"s{s}-b{c['batch']}-d{c['drop']:g}", []).append(c["median_ms"])
        print(f"round {r + 1}/{rounds} done", flush=True)
    out = {}
    for key, values in cells.items():
        s, b, _ = key.split("-")
        base = statistics.median(cells[f"{s}-{b}-d0"])
        out[key] = {
            "median_ms": statistics.median(values),
            "vs_drop0": statistics.median(values) / base,
            "round_medians_ms": values,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "frontier" / "cifar10" / "ft-dense")
    p.add_argument("--blocks", default="0,1,2,3")
    p.add_argument("--drops", default="0.1,0.3,0.5,0.6,0.7")
    p.add_argument("--part", choices=("accuracy", "latency", "both"), default="both")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR)
    args = p.parse_args()
    work = args.checkpoint.parent / f"{args.checkpoint.name}-select-block"
    blocks = [int(b) for b in args.blocks.split(",")]
    drops = [float(d) for d in args.drops.split(",")]
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    if result.get("checkpoint") != shown(args.checkpoint):  # another model: nothing measured on it yet
        result = {}
    model, meta = load_model(args.checkpoint)
    depth = len(model.blocks)
    result.update(
        {
            "checkpoint": shown(args.checkpoint),
            "depth": depth,
            "default_select_block": select_block_of(depth),
            "blocks": blocks,
        }
    )
    work.mkdir(parents=True, exist_ok=True)
    graphs = export_graphs(args.checkpoint, work, blocks)
    if args.part in ("accuracy", "both"):
        result["accuracy"] = accuracy_grid(
            model, meta["preprocess"], DataConfig(str(cifar10_folder(args.archive))), blocks, drops
        )
        result["accuracy_drops"], result["accuracy_machine"] = drops, machine()
    if args.part in ("latency", "both"):
        result["latency"] = latency_grid(graphs, drops, [1, 64], args.runs, args.rounds)
        result["latency_drops"], result["latency_machine"] = drops, machine()
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")
    acc, lat = result.get("accuracy", {}), result.get("latency", {})
    if acc:
        print(f"dense accuracy {acc['dense']:.2f}%")
    print(f"{'block':>5} {'drop':>5} {'accuracy':>9} {'b1 x d0':>8} {'b64 x d0':>9}")
    for s in blocks:
        for d in sorted(set(result.get("accuracy_drops", [])) | set(result.get("latency_drops", []))):
            a = acc.get(f"s{s}-d{d:g}")
            l1, l64 = lat.get(f"s{s}-b1-d{d:g}", {}).get("vs_drop0"), lat.get(f"s{s}-b64-d{d:g}", {}).get("vs_drop0")
            print(
                f"{s:>5} {d:>5g} {a if a is None else round(a, 2)!s:>9} {'-' if l1 is None else f'{l1:.3f}':>8} "
                f"{'-' if l64 is None else f'{l64:.3f}':>9}"
            )


if __name__ == "__main__":
    main()
