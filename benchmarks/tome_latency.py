"""Inference latency of patch dropping and token merging (ToMe) on one model, as a fraction of dense.

One random-weight ViT (ViT-Tiny shape, depth 12; by default 32x32 images with 4x4 patches = 64
patches, LOTUS's CIFAR-10 setup; --img-size 224 for 16x16 patches = 196) on the CPU, at batch 1
and 64:

- PyTorch: the dense forward; LOTUS dropping (`forward_dropping`: class-token attention in the
  select block keeps N - round(drop * N) patches) at each --drops; ToMe (`lotus.merge`) at
  each --merges tokens merged per block (capped at half the patch tokens left, so at least one
  patch token remains);
- ONNX Runtime, unless --no-onnx: LOTUS's exported `model.onnx` (dense = drop 0) and one
  `export_merging` graph per --merges value.

Latency does not depend on the weights; accuracy does, and needs trained models (not measured
here). Every (variant, batch) cell is timed once per round, in a shuffled order, so machine
noise hits every variant alike; a timing is the mean of enough calls to fill one batch of 64
images, and the median over --rounds is reported. `token_ratio` is the mean number of tokens
entering a block over the dense model's. On a machine whose cores are shared with other work,
--threads 1 gives steadier figures: two PyTorch threads stall whenever one is descheduled.

    python benchmarks/tome_latency.py [--rounds 10] [--img-size 224] [--no-onnx]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import time_rounds, write_result

from lotus.checkpoint import save_model
from lotus.drop import num_keep
from lotus.export import ExportConfig, export_merging, export_onnx
from lotus.merge import forward_merging, merge_schedule
from lotus.runtime import ort_session
from lotus.vit import ModelConfig, build_model


def tokens_entering_blocks(method: str, setting: float, num_patches: int, depth: int, select_block: int) -> list[int]:
    """Tokens (class token included) that enter each block's attention."""
    if method == "merge":
        merges = merge_schedule(num_patches, depth, int(setting))
        return [1 + num_patches - sum(merges[:i]) for i in range(depth)]
    kept = num_keep(num_patches, setting) if method == "drop" else num_patches
    return [1 + (num_patches if i <= select_block else kept) for i in range(depth)]


def export_graphs(model, cfg: ModelConfig, args, folder: Path) -> dict[tuple[str, float], Path]:
    """LOTUS's dropping graph and one token-merging graph per --merges value, in `folder`."""
    pre = {"img_size": cfg.img_size, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": [str(i) for i in range(10)]}
    save_model(folder / "run", model, cfg, pre, None, sparsity={"overall": 0.0})
    print("exporting the dropping graph", flush=True)
    export_onnx(folder / "run", folder / "model.onnx", None, ExportConfig(verify=False, select_block=args.select_block))
    graphs = {("drop", 0.0): folder / "model.onnx"}
    for merge in args.merges:
        print(f"exporting the merging graph at {merge} per block", flush=True)
        graphs[("merge", merge)] = export_merging(model, merge, folder / f"tome_{merge}.onnx")
    return graphs


def onnx_calls(graphs: dict, drops: list[float], threads: int) -> dict[tuple[str, str, float], Callable]:
    """(engine, method, setting) -> a function of the images, for every ONNX Runtime variant."""
    # no spinning: idle ONNX Runtime threads must not take the cores from PyTorch's turns
    drop_session = ort_session(graphs[("drop", 0.0)], threads, ["CPUExecutionProvider"], spinning=False)
    calls = {}
    for drop in [0.0, *drops]:
        feed = np.array(drop, dtype=np.float32)
        method = "dense" if drop == 0.0 else "drop"
        calls[("onnxruntime", method, drop)] = lambda x, feed=feed: drop_session.run(None, {"pixel_values": x, "drop": feed})
    for (method, setting), path in graphs.items():
        if method == "merge":
            session = ort_session(path, threads, ["CPUExecutionProvider"], spinning=False)
            calls[("onnxruntime", "merge", setting)] = lambda x, session=session: session.run(None, {"pixel_values": x})
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=32, help="32: 4x4 patches (64); 224: 16x16 patches (196).")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64])
    p.add_argument("--drops", type=lambda s: [float(v) for v in s.split(",")], default=[0.1, 0.3, 0.5, 0.7])
    p.add_argument("--select-block", type=int, default=2)
    p.add_argument("--merges", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 6, 8])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="Untimed calls per cell before the rounds.")
    p.add_argument("--threads", type=int, default=2, help="PyTorch and ONNX Runtime intra-op threads.")
    p.add_argument("--no-onnx", action="store_true", help="Time PyTorch only (the exports take minutes).")
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(num_classes=10, img_size=args.img_size, depth=args.depth, drop_path_rate=0.0)
    model = build_model(cfg).eval()
    N, depth = cfg.num_patches, args.depth

    calls: dict[tuple[str, str, float], Callable] = {("torch", "dense", 0.0): model}
    for drop in args.drops:
        keep = num_keep(N, drop)
        calls[("torch", "drop", drop)] = lambda x, keep=keep: model.forward_dropping(x, keep, args.select_block)
    for merge in args.merges:
        calls[("torch", "merge", merge)] = lambda x, merge=merge: forward_merging(model, x, merge)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_onnx:
            calls.update(onnx_calls(export_graphs(model, cfg, args, Path(tmp)), args.drops, args.threads))

        times = time_rounds(calls, args.batch_sizes, args.img_size, args.rounds, args.warmup)
        repeats = {b: max(1, max(args.batch_sizes) // b) for b in args.batch_sizes}

    dense_tokens = sum(tokens_entering_blocks("dense", 0.0, N, depth, args.select_block))
    rows = []
    print(f"{'engine':>11} {'method':>6} {'setting':>7} {'batch':>5} {'tokens':>6} {'median ms':>10} {'x dense':>8}")
    for (engine, method, setting), batch in [(variant, batch) for variant in calls for batch in args.batch_sizes]:
        median = statistics.median(times[(engine, method, setting), batch])
        dense = statistics.median(times[(engine, "dense", 0.0), batch])
        tokens = tokens_entering_blocks(method, setting, N, depth, args.select_block)
        row = {
            "engine": engine,
            "method": method,
            "setting": setting,  # drop ratio, or tokens merged per block
            "batch": batch,
            "tokens_entering_blocks": tokens,
            "token_ratio": sum(tokens) / dense_tokens,
            "median_ms": median * 1000,
            "fraction_of_dense": median / dense,
            "all_ms": [t * 1000 for t in times[(engine, method, setting), batch]],
        }
        rows.append(row)
        print(
            f"{engine:>11} {method:>6} {setting:>7g} {batch:>5} {row['token_ratio']:>6.3f} {median * 1000:>10.2f} {median / dense:>8.3f}"
        )
    write_result(
        "tome_latency" + ("" if args.img_size == 32 else f"_{args.img_size}"),
        {
            "model": f"vit_tiny_patch16_224 shape, random weights, img {args.img_size}, patch {model.patch_embed.patch_size[0]}, depth {depth}",
            "num_patches": N,
            "select_block": args.select_block,
            "threads": args.threads,
            "rounds": args.rounds,
            "calls_per_timing": {str(b): n for b, n in repeats.items()},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
