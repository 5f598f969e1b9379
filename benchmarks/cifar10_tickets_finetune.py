"""Tickets where `lotus compress` uses them: fine-tuning a pruned model, attention vs random vs full.

From the baseline checkpoint, prunes one-shot by magnitude to --sparsity (stage 1 of
`lotus compress`), then fine-tunes that same pruned model with `lotus compress`'s fine-tuning
recipe on (a) full data, (b) attention tickets, (c) random tickets at each drop ratio, masks
held, recording test accuracy after every epoch. Tickets are scored by the dense baseline, as in
the pipeline; --scores-from reuses an earlier scoring of it (lotus tickets --scores-from).
Every run starts from the same weights, so seed noise is smaller than when training from scratch;
--seed changes the batch order, augmentation and random tickets to measure it.

Each finished run is saved to benchmarks/results/cifar10_tickets_finetune/s<S>-epochs<E>/<run>.json
and skipped when the script runs again.

    python benchmarks/cifar10_tickets_finetune.py --baseline runs/gpu/baseline --sparsity 0.5 --epochs 1 \\
        --layers all --scores-from runs/bench-cifar10-tickets/tickets-attention-0.5-layersall-fuse
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from cifar10_tickets import _plot, _seed_means, run_name
from common import RESULTS, ROOT, SHARED_CIFAR, cifar10_folder, machine

from lotus.data import DataConfig
from lotus.pipeline import default_compress_config
from lotus.prune import prune_oneshot
from lotus.tickets import TicketConfig, parse_layers, tickets_from_checkpoint
from lotus.train import train
from lotus.vit import ModelConfig

OUT = RESULTS / "cifar10_tickets_finetune"


def report(out: Path) -> None:
    """Print the table (and the seed means) of every saved run in `out`, and plot them."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    if not runs:
        print("no runs saved yet")
        return
    first = next(iter(runs.values()))
    print(f"pruned model before fine-tuning: {first['pruned_accuracy']:.2f}%")
    print(f"{'run':>30} " + " ".join(f"{'ep' + str(h['epoch']):>6}" for h in first["history"]) + f" {'s/epoch':>8}")
    for name, r in runs.items():
        seconds = sum(h["epoch_seconds"] for h in r["history"]) / len(r["history"])
        print(f"{name:>30} " + " ".join(f"{h['test_accuracy']:6.2f}" for h in r["history"]) + f" {seconds:8.0f}")
    means = _seed_means(runs)
    for name, r in means.items():
        if "(mean of" in name:
            print(f"{name:>40}: {r['history'][-1]['test_accuracy']:.2f}")
    _plot(means, out / "curves.png", f"fine-tuning the {first['sparsity']:g}-sparse model")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs" / "bench-cifar10-baseline")
    p.add_argument("--sparsity", type=float, default=0.5, help="stage-1 one-shot sparsity of the model fine-tuned")
    p.add_argument("--drops", default="0.3,0.5")
    p.add_argument("--selects", default="full,attention,random", help="which runs: full, attention, random")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs")
    p.add_argument("--layers", default="all", help="blocks whose attention scores the tickets (lotus tickets --layers)")
    p.add_argument("--balance", action="store_true", help="rank attention scores by patch position (lotus tickets --balance)")
    p.add_argument("--scores-from", type=Path, default=None, help="earlier attention tickets of --baseline to cut again")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning run (and of the random tickets)")
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-cifar10-tickets-finetune")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = OUT / f"s{args.sparsity:g}-epochs{args.epochs}"
    if args.report_only:
        return report(out)

    data_cfg = DataConfig(str(cifar10_folder(args.archive)))
    cfg = default_compress_config(data_cfg.name)
    finetune = replace(cfg.finetune, epochs=args.epochs, warmup_epochs=min(0.5, args.epochs / 4), seed=args.seed)
    pruned_ckpt = args.work / f"stage1-{args.sparsity:g}"
    if not (pruned_ckpt / "model.safetensors").exists():
        prune_oneshot(args.baseline, args.sparsity, pruned_ckpt, cfg.prune, data_cfg=data_cfg)
    pruned = json.loads((pruned_ckpt / "model.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    layers = parse_layers(args.layers)
    selects = args.selects.split(",")
    todo = [("full", 0.0)] if "full" in selects else []
    todo += [(s, float(d)) for d in args.drops.split(",") for s in ("attention", "random") if s in selects]
    for select, drop in todo:
        balance = args.balance and select == "attention"
        scoring = "-".join(([f"layers{args.layers.replace(',', '.')}"] if layers else []) + (["balance"] if args.balance else []))
        name = run_name(select, drop, seed=args.seed, scoring=scoring)
        result_path = out / f"{name}.json"
        if result_path.exists():
            print(f"{name}: already measured ({result_path})")
            continue
        tickets_dir = None
        if select != "full":
            tickets_dir = args.work / f"tickets-{name.split('-seed')[0] if select == 'attention' else name}"
            if not (tickets_dir / "tickets.json").exists():
                ticket_cfg = TicketConfig(drop=drop, select=select, layers=layers, seed=args.seed, balance=balance)
                tickets_from_checkpoint(
                    args.baseline,
                    data_cfg,
                    ticket_cfg,
                    tickets_dir,
                    scores_from=args.scores_from if select == "attention" else None,
                )
        start = time.perf_counter()
        history = train(
            data_cfg,
            ModelConfig(),
            finetune,
            args.work / f"s{args.sparsity:g}-epochs{args.epochs}-{name}",
            init_checkpoint=pruned_ckpt,
            tickets=tickets_dir,
            resume=True,
        )
        result = {
            "machine": machine(),
            "run": name,
            "select": select,
            "drop": drop,
            "seed": args.seed,
            "layers": layers,
            "balance": balance,
            "sparsity": args.sparsity,
            "pruned_accuracy": pruned["accuracy"],
            "finetune": asdict(finetune),
            "baseline": str(args.baseline),
            "wall_seconds": time.perf_counter() - start,
            "history": history,
        }
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: test accuracy per epoch {[round(h['test_accuracy'], 2) for h in history]}")
    report(out)


if __name__ == "__main__":
    main()
