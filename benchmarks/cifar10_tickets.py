"""Data lottery tickets on CIFAR-10 (../shared): attention tickets vs random drop vs full data.

From a baseline checkpoint (benchmarks/cifar10_baseline.py), makes attention and random tickets
at each drop ratio, then trains a fresh default model for the same number of epochs on
(a) full data, (b) attention tickets, (c) random tickets at each ratio, recording test accuracy,
loss and time after every epoch. Each finished run is saved to
benchmarks/results/cifar10_tickets/epochs<E>/<run>.json and skipped when the script runs again, so the
grid can be filled over several sessions; the table and the plot (like the paper's Figure 4)
are rebuilt from all saved runs.

    python benchmarks/cifar10_tickets.py --baseline runs/bench-cifar10-baseline --epochs 5
    python benchmarks/cifar10_tickets.py --report-only
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from common import RESULTS, ROOT, SHARED_CIFAR, cifar10_folder, machine

from lotus.data import DataConfig
from lotus.tickets import TicketConfig, tickets_from_checkpoint
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig

OUT = RESULTS / "cifar10_tickets"


def run_name(select: str, drop: float) -> str:
    return "full" if select == "full" else f"{select}-{drop:g}"


def report(epochs: int) -> None:
    """Print the table and draw the plot of every saved run at this epoch budget."""
    out = OUT / f"epochs{epochs}"
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    if not runs:
        print("no runs saved yet")
        return
    def mean(r: dict, key: str) -> float | None:
        values = [h[key] for h in r["history"] if key in h]
        return sum(values) / len(values) if values else None

    full = runs.get("full")
    print(f"{'run':>14} " + " ".join(f"{'ep' + str(e):>6}" for e in range(1, 6)) + f" {'s/epoch':>8} {'x full':>7} {'cpu s':>7} {'x full':>7}")
    for name, r in runs.items():
        accs = " ".join(f"{h['test_accuracy']:6.2f}" for h in r["history"])
        cells = []
        for key in ("epoch_seconds", "epoch_cpu_seconds"):  # wall time, and CPU time (robust to other load)
            value, base = mean(r, key), mean(full, key) if full else None
            r[f"mean_{key}"] = value
            cells.append(f"{value:>8.0f}" if value else f"{'-':>8}")
            cells.append(f"{value / base:7.3f}" if value and base else f"{'-':>7}")
        print(f"{name:>14} {accs} " + " ".join(cells))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in runs.items():
        ep = [h["epoch"] for h in r["history"]]
        style = "-" if name == "full" else ("--" if name.startswith("attention") else ":")
        ax_acc.plot(ep, [h["test_accuracy"] for h in r["history"]], style, marker="o", label=name)
        ax_loss.plot(ep, [h["train_loss"] for h in r["history"]], style, marker="o", label=name)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="CIFAR-10: accuracy per epoch")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss per epoch")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"wrote {out / 'curves.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs" / "bench-cifar10-baseline")
    p.add_argument("--drops", default="0.1,0.3,0.5")
    p.add_argument("--selects", default="full,attention,random", help="which runs: full, attention, random")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-cifar10-tickets")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.report_only:
        return report(args.epochs)

    data_cfg = DataConfig(str(cifar10_folder(args.archive)))
    drops = [float(d) for d in args.drops.split(",")]
    selects = args.selects.split(",")
    train_cfg = TrainConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs)
    out = OUT / f"epochs{args.epochs}"  # runs are compared at equal budgets only
    out.mkdir(parents=True, exist_ok=True)
    todo = [("full", 0.0)] if "full" in selects else []
    todo += [(s, d) for d in drops for s in ("attention", "random") if s in selects]
    for select, drop in todo:
        name = run_name(select, drop)
        result_path = out / f"{name}.json"
        if result_path.exists():
            print(f"{name}: already measured ({result_path})")
            continue
        tickets_dir = None
        scoring_seconds = None
        if select != "full":
            tickets_dir = args.work / f"tickets-{name}"
            if not (tickets_dir / "tickets.json").exists():
                start = time.perf_counter()
                tickets_from_checkpoint(args.baseline, data_cfg, TicketConfig(drop=drop, select=select), tickets_dir)
                scoring_seconds = time.perf_counter() - start
        start = time.perf_counter()
        history = train(data_cfg, ModelConfig(), train_cfg, args.work / f"epochs{args.epochs}-{name}", tickets=tickets_dir, resume=True)
        result = {
            "machine": machine(), "run": name, "select": select, "drop": drop, "train": asdict(train_cfg),
            "baseline": str(args.baseline), "scoring_seconds": scoring_seconds,
            "wall_seconds": time.perf_counter() - start, "history": history,
            "mean_epoch_seconds": sum(h["epoch_seconds"] for h in history) / len(history),
        }
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: test accuracy per epoch {[round(h['test_accuracy'], 2) for h in history]}")
    report(args.epochs)


if __name__ == "__main__":
    main()
