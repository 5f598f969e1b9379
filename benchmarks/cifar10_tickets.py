"""Data lottery tickets on CIFAR-10 (../shared): attention tickets vs random drop vs full data.

From a baseline checkpoint (benchmarks/cifar10_baseline.py), makes attention and random tickets
at each drop ratio, then trains a fresh default model for the same number of epochs on
(a) full data, (b) attention tickets, (c) random tickets at each ratio, recording test accuracy,
loss and time after every epoch. Each finished run is saved to
benchmarks/results/cifar10_tickets/epochs<E>/<run>.json and skipped when the script runs again, so the
grid can be filled over several runs of the script; the table and the plot (like the paper's Figure 4)
are rebuilt from all saved runs.

    python benchmarks/cifar10_tickets.py --baseline runs/bench-cifar10-baseline --epochs 5
    python benchmarks/cifar10_tickets.py --report-only
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from common import RESULTS, ROOT, SHARED_CIFAR, cifar10_folder, machine

from lotus.data import DataConfig
from lotus.tickets import TicketConfig, parse_layers, tickets_from_checkpoint
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig

SUITE = "cifar10_tickets"  # results go to RESULTS/<suite>/epochs<E>/


def run_name(select: str, drop: float, temperature: float = 0.0, seed: int = 0, scoring: str = "", fuse: bool = False) -> str:
    """'full', 'attention-0.5', 'attention-0.5-t1' (sampled at temperature 1), 'random-0.5-sampled',
    'attention-0.5-rollout' (another scoring), 'random-0.5-fuse' (with a fused token), each with
    '-seed1' when trained with another seed."""
    name = "full" if select == "full" else f"{select}-{drop:g}"
    if scoring and select == "attention":
        name += f"-{scoring}"
    if temperature and select != "full":
        name += "-sampled" if select == "random" else f"-t{temperature:g}"
    if fuse and select != "full":
        name += "-fuse"
    return name + (f"-seed{seed}" if seed else "")


def report(epochs: int, also: list[Path] = (), suite: str = SUITE) -> None:
    """Print the table and draw the plot of every saved run at this epoch budget, with the runs
    saved under the results folders `also` (another machine's runs; the plots go to this one's)."""
    out = RESULTS / suite / f"epochs{epochs}"
    runs = {
        p.stem: json.loads(p.read_text())
        for d in (*also, RESULTS)
        for p in sorted((d / suite / f"epochs{epochs}").glob("*.json"))
    }
    runs = dict(sorted(runs.items()))
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        print("no runs saved yet")
        return

    def mean(r: dict, key: str) -> float | None:
        values = [h[key] for h in r["history"] if key in h]
        return sum(values) / len(values) if values else None

    full = runs.get("full")
    print(
        f"{'run':>34} "
        + " ".join(f"{'ep' + str(e):>6}" for e in range(1, 6))
        + f" {'s/epoch':>8} {'x full':>7} {'cpu s':>7} {'x full':>7}  device"
    )
    for name, r in runs.items():
        accs = " ".join(f"{h['test_accuracy']:6.2f}" for h in r["history"])
        cells = []
        for key in ("epoch_seconds", "epoch_cpu_seconds"):  # wall time, and CPU time (robust to other load)
            value, base = mean(r, key), mean(full, key) if full else None
            r[f"mean_{key}"] = value
            cells.append(f"{value:>8.0f}" if value else f"{'-':>8}")
            cells.append(f"{value / base:7.3f}" if value and base else f"{'-':>7}")
        print(f"{name:>34} {accs} " + " ".join(cells) + f"  {r['machine'].get('gpu') or r['machine'].get('cpu', '')}")
    seeds: dict[str, list[float]] = {}  # runs that differ only by the training seed
    for name, r in runs.items():
        seeds.setdefault(name.split("-seed")[0], []).append(r["history"][-1]["test_accuracy"])
    if any(len(v) > 1 for v in seeds.values()):
        print("\nfinal accuracy over seeds:")
        for name, accs in seeds.items():
            if len(accs) > 1:
                print(
                    f"{name:>34}: mean {statistics.mean(accs):.2f}, sd {statistics.stdev(accs):.2f} over {len(accs)} ("
                    + ", ".join(f"{a:.2f}" for a in accs)
                    + ")"
                )
    grid = {
        n: r for n, r in runs.items() if n == "full" or re.fullmatch(r"(attention|random)-[0-9.]+", n)
    }  # the default scoring, seed 0
    title = "CIFAR-10" if suite == SUITE else suite
    _plot(grid, out / "curves.png", f"{title} tickets grid")
    for drop in (0.3, 0.5):  # every selection tried at this ratio, seeds averaged
        variants = _seed_means({n: r for n, r in runs.items() if n == "full" or r["drop"] == drop})
        if len(variants) > len(grid.keys() & variants.keys()):
            _plot(variants, out / f"curves-drop{drop:g}.png", f"{title}, drop {drop:g}: selections (seed means)")


def _seed_means(runs: dict[str, dict]) -> dict[str, dict]:
    """Runs that differ only by the training seed, averaged epoch by epoch ('name (mean of N)')."""
    groups: dict[str, list[dict]] = {}
    for name, r in runs.items():
        groups.setdefault(name.split("-seed")[0], []).append(r)
    means = {}
    for name, group in groups.items():
        history = [
            {"epoch": hs[0]["epoch"], **{k: sum(h[k] for h in hs) / len(hs) for k in ("test_accuracy", "train_loss")}}
            for hs in zip(*(r["history"] for r in group))
        ]
        means[name + (f" (mean of {len(group)})" if len(group) > 1 else "")] = {**group[0], "history": history}
    return means


def _plot(runs: dict[str, dict], path: Path, title: str) -> None:
    """Accuracy and training loss per epoch (like the paper's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    for i, (name, r) in enumerate(runs.items()):
        ep = [h["epoch"] for h in r["history"]]
        style = dict(
            linestyle="-" if name == "full" else ("--" if name.startswith("attention") else ":"),
            marker="o",
            color=colors[i % len(colors)],
            label=name,
        )
        ax_acc.plot(ep, [h["test_accuracy"] for h in r["history"]], **style)
        ax_loss.plot(ep, [h["train_loss"] for h in r["history"]], **style)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: accuracy per epoch")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss per epoch")
    ax_loss.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs" / "bench-cifar10-baseline")
    p.add_argument("--drops", default="0.1,0.3,0.5")
    p.add_argument("--selects", default="full,attention,random", help="which runs: full, attention, random")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=0.0, help="ticket sampling (see lotus.tickets): 0 = fixed top-K")
    p.add_argument("--method", default="cls", choices=["cls", "rollout"], help="attention scoring (see lotus tickets)")
    p.add_argument("--layers", default="all", help="blocks scored, e.g. '-1', '2' or '0,1,2'")
    p.add_argument(
        "--spread", type=int, default=1, help="keep the best of every S x S block of patches first (lotus tickets --spread)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the training run (and of the random tickets)")
    p.add_argument("--fuse", action="store_true", help="one more token fusing the dropped patches (lotus tickets --fuse)")
    p.add_argument("--balance", action="store_true", help="rank attention scores by patch position (lotus tickets --balance)")
    p.add_argument("--tag", default="", help="added to the attention runs' names, e.g. which --baseline scored them")
    p.add_argument(
        "--scores-from",
        type=Path,
        default=None,
        help="earlier attention tickets of the same baseline: cut their scores again (lotus tickets --scores-from)",
    )
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR)
    p.add_argument(
        "--data", type=Path, default=None, help="another ImageFolder root (e.g. cluttered_cifar10.py's) instead of the archive"
    )
    p.add_argument(
        "--patch-size", type=int, default=None, help="patch side of the trained models (default: lotus's for the image size)"
    )
    p.add_argument("--suite", default=SUITE, help="results folder name, one per dataset: RESULTS/SUITE/epochs<E>/")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-cifar10-tickets")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--with",
        dest="also",
        type=Path,
        action="append",
        default=[],
        help="another results folder whose runs join the report, e.g. benchmarks/results/h200",
    )
    args = p.parse_args()
    if args.report_only:
        return report(args.epochs, args.also, args.suite)

    data_cfg = DataConfig(str(args.data or cifar10_folder(args.archive)))
    drops = [float(d) for d in args.drops.split(",")]
    selects = args.selects.split(",")
    train_cfg = TrainConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs, seed=args.seed)
    out = RESULTS / args.suite / f"epochs{args.epochs}"  # runs are compared at equal budgets only
    out.mkdir(parents=True, exist_ok=True)
    todo = [("full", 0.0)] if "full" in selects else []
    todo += [(s, d) for d in drops for s in ("attention", "random") if s in selects]
    for select, drop in todo:
        layers = parse_layers(args.layers)
        balance = args.balance and select == "attention"
        scoring = "-".join(
            ([args.method] if args.method != "cls" else [])
            + ([f"layers{args.layers.replace(',', '.')}"] if layers else [])
            + ([f"spread{args.spread}"] if args.spread > 1 else [])
            + (["balance"] if args.balance else [])
            + ([args.tag] if args.tag else [])
        )
        name = run_name(select, drop, args.temperature, args.seed, scoring, args.fuse)
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
                how = dict(method=args.method, layers=layers, balance=balance) if select == "attention" else {}
                ticket_cfg = TicketConfig(
                    drop=drop,
                    select=select,
                    temperature=args.temperature,
                    spread=args.spread,
                    fuse=args.fuse,
                    seed=args.seed,
                    **how,
                )
                scores_from = args.scores_from if select == "attention" else None
                tickets_from_checkpoint(args.baseline, data_cfg, ticket_cfg, tickets_dir, scores_from=scores_from)
                scoring_seconds = time.perf_counter() - start
        start = time.perf_counter()
        history = train(
            data_cfg,
            ModelConfig(patch_size=args.patch_size),
            train_cfg,
            args.work / f"epochs{args.epochs}-{name}",
            tickets=tickets_dir,
            resume=True,
        )
        result = {
            "machine": machine(),
            "run": name,
            "select": select,
            "drop": drop,
            "temperature": args.temperature,
            "seed": args.seed,
            "method": args.method,
            "layers": layers,
            "fuse": args.fuse,
            "tag": args.tag,
            "spread": args.spread,
            "balance": balance,
            "train": asdict(train_cfg),
            "data": data_cfg.name,
            "patch_size": args.patch_size,
            "baseline": str(args.baseline),
            "scoring_seconds": scoring_seconds,
            "wall_seconds": time.perf_counter() - start,
            "history": history,
            "mean_epoch_seconds": sum(h["epoch_seconds"] for h in history) / len(history),
        }
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: test accuracy per epoch {[round(h['test_accuracy'], 2) for h in history]}")
    report(args.epochs, args.also, args.suite)


if __name__ == "__main__":
    main()
