"""2:4 semi-structured sparsity on an NVIDIA GPU: a ViT-Tiny's block Linears, bf16.

Takes a LOTUS checkpoint pruned with `--sparsity 2:4` (or prunes a random ViT-Tiny at
CIFAR-10's shape to 2:4 with `lotus.masks.semi_structured_masks`), swaps the block Linear
weights for PyTorch's semi-structured sparse tensors (`lotus.masks.to_semi_structured_`, sparse
tensor cores, Ampere or newer) and times the forward pass against the same model run dense in
bf16, side by side (CUDA events, the two models taking turns for several rounds), at each batch
size. With --data it also measures test accuracy through the sparse kernels. Needs a CUDA GPU;
on a machine without one it says so and exits: no speed is guessed.

    python benchmarks/sparse24_gpu.py [--checkpoint runs/NAME --data PATH] [--batches 64,256,1024]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from common import write_result
from torch.sparse import to_sparse_semi_structured

from lotus.checkpoint import load_model
from lotus.masks import apply_masks_, holds_pattern, prunable_names, semi_structured_masks, to_semi_structured_
from lotus.vit import ModelConfig, build_model


def time_forward(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Median milliseconds of one forward pass (CUDA events)."""
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    correct = sum(
        (model(images[i : i + batch]).argmax(-1) == labels[i : i + batch]).sum().item() for i in range(0, len(images), batch)
    )
    return 100.0 * correct / len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="a LOTUS checkpoint pruned to 2:4 (default: a random ViT-Tiny)")
    p.add_argument("--data", default=None, help="with --checkpoint: measure test accuracy on this dataset too")
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default="sparse24_gpu")
    p.add_argument("--linear", type=int, default=0, help="also time one N x N Linear on 8192 tokens (e.g. 4096)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: 2:4 sparse kernels need an NVIDIA GPU (Ampere or newer); nothing was measured")

    model, meta = load_model(args.checkpoint) if args.checkpoint else (build_model(ModelConfig()), None)
    dense = model.cuda().bfloat16().eval()
    names = prunable_names(dense)
    params = dict(dense.named_parameters())
    holds_24 = all(holds_pattern(params[n]) for n in names)
    if not holds_24:  # a dense model: prune it to 2:4 here (speed does not depend on the values)
        apply_masks_(dense, semi_structured_masks({n: params[n].detach() for n in names}))
    sparse = to_semi_structured_(copy.deepcopy(dense), names)
    size = dense.patch_embed.img_size[0]
    result = {
        "device": torch.cuda.get_device_name(),
        "dtype": "bfloat16",
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "pruned_here": not holds_24,
        "torch": torch.__version__,
        "rows": [],
    }
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
            error = (sparse(x).float() - dense(x).float()).abs().max().item()
            dense_ms, sparse_ms = [], []
            for _ in range(args.rounds):
                dense_ms.append(time_forward(dense, x, args.runs))
                sparse_ms.append(time_forward(sparse, x, args.runs))
            row = {
                "batch": batch,
                "dense_ms": statistics.median(dense_ms),
                "sparse24_ms": statistics.median(sparse_ms),
                "speedup": statistics.median(d / s for d, s in zip(dense_ms, sparse_ms)),
                "max_abs_diff_vs_dense_masked": error,
            }
            print(row, flush=True)
            result["rows"].append(row)
    if args.linear:  # one square Linear of the width sparse kernels are made for, at a batch of tokens
        n = args.linear
        w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        w = w * semi_structured_masks({"w": w})["w"]
        lin_dense = torch.nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16)
        lin_dense.weight = torch.nn.Parameter(w, requires_grad=False)
        lin_sparse = torch.nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16)
        lin_sparse.weight = torch.nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        x = torch.randn(8192, n, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            d = [time_forward(lin_dense, x, args.runs) for _ in range(args.rounds)]
            sp = [time_forward(lin_sparse, x, args.runs) for _ in range(args.rounds)]
        result["linear"] = {
            "in_out": n,
            "tokens": 8192,
            "dense_ms": statistics.median(d),
            "sparse24_ms": statistics.median(sp),
            "speedup": statistics.median(a / b for a, b in zip(d, sp)),
        }
        print(result["linear"], flush=True)
    if args.checkpoint and args.data:
        from lotus.data import DataConfig, load_split_for_model

        pre = meta["preprocess"]
        test = load_split_for_model(DataConfig(args.data), pre, "test")
        mean = torch.tensor(pre["mean"], device="cuda").view(1, 3, 1, 1) * 255
        std = torch.tensor(pre["std"], device="cuda").view(1, 3, 1, 1) * 255
        images = ((test.images.cuda().float() - mean) / std).bfloat16()
        labels = test.labels.cuda()
        result["accuracy"] = {"dense_bf16": accuracy(dense, images, labels), "sparse24_kernels": accuracy(sparse, images, labels)}
        print(result["accuracy"])
    write_result(args.name, result)


if __name__ == "__main__":
    main()
