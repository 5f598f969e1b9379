"""Throughput of ticket scoring against plain evaluation (inference mode, same batches).

Default model (ViT-Tiny shape, 32x32, patch 4), random weights and images (speed does not
depend on them), batch 256 on the CPU. Plain evaluation, class-token scoring (last block) and
rollout scoring (all blocks) are timed round-robin, batch by batch, so noise hits all alike.
Target: scoring throughput >= 0.8x evaluation.

    python benchmarks/tickets_scoring_speed.py [--batches 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

from lotus.tickets import TicketConfig, score_batch
from lotus.vit import ModelConfig, build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=8)
    args = p.parse_args()

    torch.manual_seed(0)
    model = build_model(ModelConfig(img_size=32, patch_size=4)).eval()
    images = torch.randn(args.batch_size, 3, 32, 32)

    def evaluate() -> None:
        with torch.inference_mode():
            model(images)

    modes = {
        "eval": evaluate,
        "score_cls": lambda: score_batch(model, images, TicketConfig(select="attention")),
        "score_rollout": lambda: score_batch(model, images, TicketConfig(select="attention", method="rollout")),
    }
    for fn in modes.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.batches):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    eval_rate = args.batch_size / statistics.median(times["eval"])
    rows = {}
    for name in modes:
        rate = args.batch_size / statistics.median(times[name])
        rows[name] = {"images_per_second": rate, "vs_eval": rate / eval_rate}
        print(f"{name:>14}: {rate:7.0f} img/s  {rate / eval_rate:5.2f}x eval")
    write_result("tickets_scoring_speed", {"batch_size": args.batch_size, "batches": args.batches, "modes": rows})


if __name__ == "__main__":
    main()
