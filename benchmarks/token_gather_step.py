"""Training-step time of the token-gathering ViT at several keep ratios, as a fraction of dense.

Default model (ViT-Tiny shape, depth 12, 32x32 images, 4x4 patches = 64 patches), batch 128,
on the CPU: forward on the kept patches + backward + AdamW step. Ratios are timed round-robin
in shuffled order, one step at a time, so machine noise hits every ratio alike; the median
of the rounds is reported.

    python benchmarks/token_gather_step.py [--rounds 5] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from common import write_result

from lotus.vit import ModelConfig, build_model

KEEP_RATIOS = (1.0, 0.9, 0.7, 0.5, 0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(img_size=32, patch_size=4)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, N = args.batch_size, cfg.num_patches
    images = torch.randn(B, 3, 32, 32)
    labels = torch.randint(0, 10, (B,))

    def step(num_keep: int) -> float:
        keep_idx = torch.rand(B, N).argsort(dim=1)[:, :num_keep]  # (B, K) a different subset per image
        start = time.perf_counter()
        loss = F.cross_entropy(model(images, None if num_keep == N else keep_idx), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    keeps = {r: round(r * N) for r in KEEP_RATIOS}
    for r in KEEP_RATIOS:
        for _ in range(args.warmup):
            step(keeps[r])
    times: dict[float, list[float]] = {r: [] for r in KEEP_RATIOS}
    for _ in range(args.rounds):
        order = list(KEEP_RATIOS)
        random.shuffle(order)
        for r in order:
            times[r].append(step(keeps[r]))

    dense = statistics.median(times[1.0])
    rows = []
    print(f"{'keep':>5} {'K':>3} {'token ratio':>11} {'step ms':>8} {'x dense':>8}")
    for r in KEEP_RATIOS:
        med = statistics.median(times[r])
        token_ratio = (1 + keeps[r]) / (1 + N)  # class token + kept patches
        rows.append(
            {
                "keep_ratio": r,
                "num_keep": keeps[r],
                "token_ratio": token_ratio,
                "step_seconds": med,
                "fraction_of_dense": med / dense,
                "all_step_seconds": times[r],
            }
        )
        print(f"{r:>5.1f} {keeps[r]:>3d} {token_ratio:>11.3f} {med * 1000:>8.1f} {med / dense:>8.3f}")
    write_result(
        "token_gather_step",
        {
            "model": "vit_tiny_patch16_224 shape, img 32, patch 4, depth 12",
            "batch_size": B,
            "rounds": args.rounds,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
