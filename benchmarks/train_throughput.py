"""Training throughput at 224 px with streamed data: the step time at keep 1.0 / 0.7 / 0.5 / 0.3
as a fraction of the full step, side by side in one run, timm's own VisionTransformer beside
LOTUS at keep 1.0, and the loader alone (images/s per worker), so it is plain whether loading
keeps up.

The batches come from a `StreamLoader` over a folder of 224-px JPEGs (generated once under data/,
or --data), with timm's RandomResizedCrop and flip, as `lotus train` streams them. Each batch
goes to the next model setting in a shuffled round-robin, so machine noise hits every setting
alike; a lottery step includes its tickets' work (resampling the score map to the crop, top-K).
The step is timed from the batch in hand to the optimizer step done (synchronised on CUDA), and
the time spent waiting for batches is reported beside it.

    python benchmarks/train_throughput.py                      # CPU: ViT-Ti/16, batch 32
    python benchmarks/train_throughput.py --device cuda        # GPU: ViT-Ti/16 and ViT-S/16, batch 256,
                                                               # bf16 autocast, torch.compile

Writes benchmarks/results/train_throughput[_cuda].json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, generated_folder, write_result

from lotus.data import DataConfig, load_split
from lotus.device import autocast
from lotus.drop import num_keep
from lotus.stream import StreamLoader, default_workers
from lotus.tickets import Tickets, keep_from_scores
from lotus.vit import ModelConfig, build_model

KEEP_RATIOS = (1.0, 0.7, 0.5, 0.3)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def loader_alone(data, batch_size: int, workers: int, batches: int) -> float:
    """Images/s the streaming loader delivers with nothing else running."""
    loader = StreamLoader(data, batch_size, MEAN, STD, augment="rrc", shuffle=True, workers=workers)
    seen, start = 0, None
    for i, batch in enumerate(loader.epoch(0)):
        if i == 1:
            start, seen = time.perf_counter(), 0  # the first batch waits for the workers to start
        seen += len(batch.labels)
        if i == batches:
            break
    return seen / (time.perf_counter() - start)


def settings(name: str, device: torch.device, compile_: bool) -> dict:
    """(label -> step function) for LOTUS at every keep ratio and timm's own model at keep 1.0."""
    import timm

    model = build_model(ModelConfig(name, num_classes=10, img_size=224, drop_path_rate=0.0)).to(device).train()
    reference = timm.create_model(name, num_classes=10, img_size=224).to(device).train()
    n = model.patch_embed.num_patches
    steps = {}
    for label, net, k in [(f"lotus keep {r}", model, num_keep(n, 1 - r)) for r in KEEP_RATIOS] + [("timm", reference, n)]:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
        forward = torch.compile(net, dynamic=False) if compile_ else net
        steps[label] = (forward, opt, k, label.startswith("timm"))
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--models", nargs="+", default=None, help="default: vit_tiny_patch16_224 (CPU); + vit_small_patch16_224 (CUDA)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on the CPU, 256 on CUDA")
    p.add_argument("--rounds", type=int, default=6, help="timed steps per setting")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: min(8, cores))")
    p.add_argument("--images", type=int, default=2000, help="size of the generated folder")
    p.add_argument("--data", type=Path, default=None, help="an ImageFolder of photos instead of the generated one")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    models = args.models or (["vit_tiny_patch16_224", "vit_small_patch16_224"] if cuda else ["vit_tiny_patch16_224"])
    batch_size = args.batch_size or (256 if cuda else 32)
    compile_ = cuda and not args.no_compile
    root = args.data or generated_folder(ROOT / "data" / f"jpeg224-{args.images}", args.images)
    data = load_split(DataConfig(str(root), img_size=224, loader="stream", val_fraction=0), "train")
    workers = args.workers if args.workers is not None else default_workers()

    alone = {w: loader_alone(data, batch_size, w, 8) for w in sorted({1, workers})}
    print("loader alone: " + ", ".join(f"{w} workers {ips:.0f} img/s ({ips / w:.0f} per worker)" for w, ips in alone.items()))

    scores = torch.rand(len(data), (224 // 16) ** 2, generator=torch.Generator().manual_seed(0))
    results = []
    for name in models:
        torch.manual_seed(0)
        steps = settings(name, device, compile_)
        grid = 224 // 16
        tickets = {
            label: Tickets(keep_from_scores(scores, k), scores, grid, 16, {"config": {"select": "attention"}})
            for label, (_, _, k, _) in steps.items()
        }
        loader = StreamLoader(data, batch_size, MEAN, STD, augment="rrc", shuffle=True, workers=workers, pin_memory=cuda)
        times: dict[str, list[float]] = {label: [] for label in steps}
        waits: list[float] = []
        order: list[str] = []
        warm = 2 * len(steps)  # every setting's first steps compile, allocate and warm up
        total = warm + args.rounds * len(steps)
        epoch, done = 0, 0
        while done < total:
            batches = iter(loader.epoch(epoch))
            while done < total:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                waits.append(time.perf_counter() - t0)
                if not order:
                    order = list(steps)
                    random.shuffle(order)
                label = order.pop()
                forward, opt, k, plain = steps[label]
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                images = batch.images.to(device, non_blocking=True)
                labels = batch.labels.to(device, non_blocking=True)
                keep = None if plain or k == grid * grid else tickets[label].for_batch(batch).to(device, non_blocking=True)
                with autocast(device):
                    logits = forward(images) if plain else forward(images, keep)
                loss = F.cross_entropy(logits.float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if cuda:
                    torch.cuda.synchronize()
                if done >= warm:
                    times[label].append(time.perf_counter() - start)
                done += 1
            epoch += 1
        full = statistics.median(times["lotus keep 1.0"])
        print(f"{name}, batch {batch_size}, {device}{' compiled' if compile_ else ''}:")
        for label, ts in times.items():
            med = statistics.median(ts)
            row = {
                "model": name,
                "setting": label,
                "step_seconds": med,
                "fraction_of_full": med / full,
                "images_per_second": batch_size / med,
                "all_step_seconds": ts,
            }
            results.append(row)
            print(f"  {label:>15}: {med * 1000:8.1f} ms/step  {batch_size / med:7.1f} img/s  {med / full:5.3f}x full")
        print(f"  waiting for batches: median {statistics.median(waits) * 1000:.1f} ms per step")
        results.append({"model": name, "setting": "wait", "wait_seconds_median": statistics.median(waits)})
    suffix = "" if not cuda else "_cuda"
    write_result(
        f"train_throughput{suffix}",
        {
            "device": str(device),
            "batch_size": batch_size,
            "compile": compile_,
            "workers": workers,
            "data": str(root),
            "loader_alone_images_per_second": {str(w): v for w, v in alone.items()},
            "rounds": args.rounds,
            "rows": results,
        },
    )


if __name__ == "__main__":
    main()
