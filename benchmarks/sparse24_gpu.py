"""2:4 semi-structured sparsity on an NVIDIA GPU: a ViT-Tiny's block Linears, bf16, batch 64.

Prunes every prunable weight of the model (a LOTUS checkpoint, or a random ViT-Tiny at
CIFAR-10's shape) to 2:4 with `lotus.masks.semi_structured_masks`, converts the Linear weights
with `torch.sparse.to_sparse_semi_structured` (sparse tensor cores, Ampere or newer), and times
the forward pass against the dense bf16 model, side by side (CUDA events, the rounds
interleaved). Needs a CUDA GPU; on a machine without one it says so and exits.

    python benchmarks/sparse24_gpu.py [--checkpoint runs/NAME] [--batch 64]
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from common import write_result

from lotus.checkpoint import load_model
from lotus.masks import apply_masks_, prunable_names, semi_structured_masks
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: 2:4 sparse kernels need an NVIDIA GPU (Ampere or newer); nothing was measured")
    from torch.sparse import to_sparse_semi_structured

    model = load_model(args.checkpoint)[0] if args.checkpoint else build_model(ModelConfig())
    dense = model.cuda().bfloat16().eval()
    names = prunable_names(dense)
    params = dict(dense.named_parameters())
    masks = semi_structured_masks({n: params[n].detach() for n in names})
    sparse = apply_masks_(copy.deepcopy(dense), masks)
    modules = dict(sparse.named_modules())
    for name in names:
        linear = modules[name.rsplit(".", 1)[0]]
        linear.weight = torch.nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
    size = dense.patch_embed.img_size[0]
    x = torch.randn(args.batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        error = (sparse(x).float() - apply_masks_(copy.deepcopy(dense), masks)(x).float()).abs().max().item()
        dense_ms, sparse_ms = [], []
        for _ in range(args.rounds):
            dense_ms.append(time_forward(dense, x, args.runs))
            sparse_ms.append(time_forward(sparse, x, args.runs))
    result = {
        "device": torch.cuda.get_device_name(), "batch": args.batch, "dtype": "bfloat16",
        "dense_ms": statistics.median(dense_ms), "sparse24_ms": statistics.median(sparse_ms),
        "speedup": statistics.median(dense_ms) / statistics.median(sparse_ms), "max_abs_diff_vs_masked_dense": error,
    }
    print(result)
    write_result("sparse24_gpu", result)


if __name__ == "__main__":
    main()
