"""Data lottery tickets on photographs (Tiny-ImageNet-100): each selection against random drop and full data.

Fine-tunes the baseline pruned one-shot to --sparsity (stage 1 of `lotus compress`) with
`lotus compress`'s fine-tuning recipe, on (a) full data, (b) each attention selection's tickets,
(c) random tickets, at each drop ratio, for every seed, and with `dense` among the selections
(d) the dense baseline fine-tuned on full data the same way, so that a gain over the baseline is
not just the extra epochs (--mode finetune); or trains a fresh model of the baseline's shape from
scratch the same way (--mode scratch). Every run of a seed sees the
same batches, so the differences are paired. The tickets are cut from the scores
`lotus tickets --boxes` writes them, scored once per selection by the baseline, with their
object coverage over the whole training split, which the report shows beside.

Each run's accuracy is taken after its last epoch on the validation split (held out of the
training images; what any choice between selections is made on) and the test split (what is
reported). Each finished run is saved under benchmarks/results/tiny_imagenet_tickets/ and skipped
when the script runs again; the summary (mean, standard deviation, paired differences with
their standard errors, epoch time as a fraction of full data) is rebuilt from all saved runs.

    python benchmarks/tiny_imagenet_tickets.py --selections grad,random --drops 0.5,0.3 --seeds 0,1,2
    python benchmarks/tiny_imagenet_tickets.py --report-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from common import RESULTS, ROOT, machine, paired, shown, tiny_imagenet_folder, write_result
from ticket_coverage import SELECTIONS

from lotus.checkpoint import load_model
from lotus.config import TrainConfig, default_compress_config
from lotus.data import DataConfig
from lotus.prune import prune_oneshot
from lotus.tickets import load_tickets, tickets_from_checkpoint
from lotus.train import evaluate_checkpoint, train
from lotus.vit import ModelConfig

SUITE = "tiny_imagenet_tickets"


WHOLE = ("full", "dense")  # trained on every patch: the pruned model, and the dense one (--mode finetune)


def run_name(selection: str, drop: float, seed: int) -> str:
    return (selection if selection in WHOLE else f"{selection}-{drop:g}") + f"-seed{seed}"


def tickets_for(args, data_cfg: DataConfig, selection: str, drop: float) -> Path:
    """The selection's tickets at `drop`, as `lotus tickets --boxes` writes them (with their object
    coverage over the whole training split): scored once, then cut again from the first scored."""
    out = args.work / f"tickets-{selection}-{drop:g}"
    if not (out / "tickets.json").exists():
        cfg = replace(SELECTIONS[selection], drop=drop, boxes=str(args.boxes or args.data / "boxes.tsv"))
        scored = "all" if selection == "balance" else selection  # balance re-ranks every block's attention
        earlier = next((d for d in sorted(args.work.glob(f"tickets-{scored}-*")) if (d / "tickets.json").exists()), None)
        tickets_from_checkpoint(args.baseline, data_cfg, cfg, out, scores_from=earlier)
    return out


def start_point(args, data_cfg: DataConfig) -> tuple[Path | None, ModelConfig, TrainConfig]:
    """What every run starts from: the pruned baseline (finetune) or nothing (scratch), the
    model's shape for scratch runs, and the recipe."""
    cfg = default_compress_config(data_cfg.name)
    if args.mode == "scratch":
        _, meta = load_model(args.baseline)
        shape = meta["model"]
        model_cfg = ModelConfig(patch_size=shape["patch_size"], depth=shape["depth"])
        recipe = replace(cfg.baseline, epochs=args.epochs, seed=0)
        return None, model_cfg, recipe
    pruned = args.work / f"stage1-{args.sparsity:g}"
    if not (pruned / "model.safetensors").exists():
        prune_oneshot(args.baseline, args.sparsity, pruned, cfg.prune, data_cfg=data_cfg)
    recipe = replace(cfg.finetune, epochs=args.epochs, warmup_epochs=min(0.5, args.epochs / 4))
    return pruned, ModelConfig(), recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs" / "frontier" / "tiny-imagenet-100" / "baseline")
    p.add_argument(
        "--data", type=Path, default=None, help="an ImageFolder root (default: Tiny-ImageNet-100, unpacked into data/ once)"
    )
    p.add_argument("--mode", default="finetune", choices=["finetune", "scratch"])
    p.add_argument("--sparsity", type=float, default=0.5, help="stage-1 one-shot sparsity of the model fine-tuned")
    p.add_argument("--selections", default="grad,random", help="ticket_coverage.py's selections, each beside full data")
    p.add_argument("--drops", default="0.5,0.3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--boxes", type=Path, default=None, help="the boxes.tsv (default: DATA/boxes.tsv)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "tiny-imagenet-tickets")
    p.add_argument(
        "--full", action=argparse.BooleanOptionalAction, default=True, help="train on full data too (the reference of 'vs full')"
    )
    p.add_argument("--tag", default="", help="appended to the grid's name: keeps grids from other baselines apart")
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="score the tickets and prune the baseline, then stop: runs started in parallel (a seed each) then only read them",
    )
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    args.data = args.data or tiny_imagenet_folder()
    if args.mode == "scratch" and "dense" in args.selections.split(","):
        p.error("--selections dense fine-tunes the dense baseline: it has no meaning with --mode scratch")
    label = f"{args.mode}-s{args.sparsity:g}-epochs{args.epochs}" if args.mode == "finetune" else f"scratch-epochs{args.epochs}"
    label += f"-{args.tag}" if args.tag else ""
    out = RESULTS / SUITE / label
    if args.prepare_only:
        prepare(args, DataConfig(str(args.data)))
        return
    if not args.report_only:
        run_grid(args, out, label)
    report(out, label, args)


def prepare(args, data_cfg: DataConfig) -> None:
    """Everything the grid's runs share: the pruned baseline and every selection's tickets."""
    start_point(args, data_cfg)
    for drop in (float(d) for d in args.drops.split(",")):
        for selection in args.selections.split(","):
            if selection not in WHOLE:
                tickets_for(args, data_cfg, selection, drop)


def run_grid(args, out: Path, label: str) -> None:
    data_cfg = DataConfig(str(args.data))
    init, model_cfg, train_cfg = start_point(args, data_cfg)
    out.mkdir(parents=True, exist_ok=True)
    drops = [float(d) for d in args.drops.split(",")]
    for seed in (int(s) for s in args.seeds.split(",")):
        selections = args.selections.split(",")
        todo = [(s, 0.0) for s in WHOLE if (s == "full" and args.full) or s in selections]
        todo += [(s, d) for d in drops for s in selections if s not in WHOLE]
        for selection, drop in todo:
            name = run_name(selection, drop, seed)
            if (out / f"{name}.json").exists():
                continue
            tickets, coverage = None, None
            if selection not in WHOLE:
                tickets = tickets_for(args, data_cfg, selection, drop)
                coverage = json.loads((tickets / "tickets.json").read_text()).get("object_coverage")
            run_dir = args.work / label / name
            start = time.perf_counter()
            history = train(
                data_cfg,
                model_cfg,
                replace(train_cfg, seed=seed),
                run_dir,
                init_checkpoint=args.baseline if selection == "dense" else init,
                tickets=tickets,
                resume=True,
            )
            val = evaluate_checkpoint(run_dir, data_cfg, split="val")
            result = {
                "machine": machine(),
                "run": name,
                "selection": selection,
                "drop": drop,
                "seed": seed,
                "mode": args.mode,
                "sparsity": args.sparsity if args.mode == "finetune" else None,
                "recipe": asdict(train_cfg),
                "object_coverage": coverage,
                "val_accuracy": val["accuracy"],
                "test_accuracy": history[-1]["test_accuracy"],
                "epoch_seconds": statistics.mean(h["epoch_seconds"] for h in history),
                "epoch_cpu_seconds": statistics.mean(h["epoch_cpu_seconds"] for h in history),
                "wall_seconds": time.perf_counter() - start,
                "history": history,
            }
            (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"{name}: val {val['accuracy']:.2f}%, test {result['test_accuracy']:.2f}%", flush=True)


def report(out: Path, label: str, args) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not runs:
        print("no runs saved yet")
        return
    by_seed = {(r["selection"], r["drop"], r["seed"]): r for r in runs}
    full = {seed: r for (s, _, seed), r in by_seed.items() if s == "full"}
    cells = sorted({(r["selection"], r["drop"]) for r in runs}, key=lambda c: (c[1], c[0] != "full", c[0] != "random", c[0]))
    rows = []
    for selection, drop in cells:
        mine = {seed: r for (s, d, seed), r in by_seed.items() if (s, d) == (selection, drop)}
        seeds = sorted(mine)
        test = [mine[s]["test_accuracy"] for s in seeds]
        row = {
            "selection": selection,
            "drop": drop,
            "seeds": seeds,
            "val_mean": statistics.mean(mine[s]["val_accuracy"] for s in seeds),
            "test_mean": statistics.mean(test),
            "test_sd": statistics.stdev(test) if len(test) > 1 else None,
            "epoch_seconds": statistics.mean(mine[s]["epoch_seconds"] for s in seeds),
            "epoch_cpu_seconds": statistics.mean(mine[s]["epoch_cpu_seconds"] for s in seeds),
        }
        both = [s for s in seeds if s in full]
        if both and selection != "full":
            row["vs_full"] = paired([full[s]["test_accuracy"] for s in both], [mine[s]["test_accuracy"] for s in both])
            row["epoch_time_vs_full"] = statistics.mean(mine[s]["epoch_seconds"] / full[s]["epoch_seconds"] for s in both)
            row["epoch_cpu_time_vs_full"] = statistics.mean(
                mine[s]["epoch_cpu_seconds"] / full[s]["epoch_cpu_seconds"] for s in both
            )
        rand = {seed: r for (s, d, seed), r in by_seed.items() if (s, d) == ("random", drop)}
        both = [s for s in seeds if s in rand]
        if both and selection not in ("full", "random"):
            row["vs_random"] = paired([rand[s]["test_accuracy"] for s in both], [mine[s]["test_accuracy"] for s in both])
            row["val_vs_random"] = paired([rand[s]["val_accuracy"] for s in both], [mine[s]["val_accuracy"] for s in both])
        rows.append(row | _tickets_figures(args, mine[seeds[0]]))  # the same tickets for every seed
    print(f"{label}: test accuracy after the last epoch (validation mean beside); differences paired by seed")
    print(
        f"{'selection':>10} {'drop':>5} {'n':>2} {'val':>6} {'test':>6} {'sd':>5} {'vs random':>14} {'vs full':>14} {'time':>6} {'object kept':>11}"
    )
    for r in rows:
        kept = f"{r['object_coverage']['object_kept']:.3f}" if "object_coverage" in r else "-"
        print(
            f"{r['selection']:>10} {r['drop']:>5g} {len(r['seeds']):>2} {r['val_mean']:6.2f} {r['test_mean']:6.2f} "
            f"{r['test_sd'] or 0:5.2f} {_difference(r, 'vs_random'):>14} {_difference(r, 'vs_full'):>14} "
            f"{r.get('epoch_time_vs_full', 1.0):6.3f} {kept:>11}"
        )
    first = runs[0]
    baseline = json.loads((args.baseline / "model.json").read_text())  # the checkpoint's record, no weights
    write_result(
        f"{SUITE}_{label}",
        {
            "data": shown(args.data),
            "baseline": shown(args.baseline),
            "baseline_test_accuracy": baseline["metrics"].get("test_accuracy"),
            "baseline_epochs": baseline["train"]["epochs"],
            "baseline_model": baseline["model"],
            "pruned_test_accuracy": _pruned_accuracy(args),
            "mode": first["mode"],
            "sparsity": first["sparsity"],
            "recipe": first["recipe"],
            "splits": {"val_mean": "validation (held out of train)", "test_mean": "test"},
            "rows": rows,
        },
    )


def _tickets_figures(args, run: dict) -> dict:
    """A run's tickets, as the report shows them: object coverage, and how often each patch
    position is kept over the training images (random tickets: the keep ratio everywhere)."""
    if run["selection"] in WHOLE:
        return {}
    # made again where this machine lacks them: random ones are seeded, attention ones re-cut from the
    # scores saved beside them (a selection never scored here is scored first: minutes)
    tickets = load_tickets(tickets_for(args, DataConfig(str(args.data)), run["selection"], run["drop"]))
    rate = torch.bincount(tickets.keep_idx.long().flatten(), minlength=tickets.grid**2).float() / len(tickets.keep_idx)
    position = {"min": rate.min().item(), "max": rate.max().item(), "sd": rate.std().item()}
    return {"object_coverage": run["object_coverage"], "position_keep_rate": position}


def _pruned_accuracy(args) -> float | None:
    """The test accuracy of the pruned baseline the fine-tuning runs start from (None from scratch)."""
    path = args.work / f"stage1-{args.sparsity:g}" / "model.json"
    return json.loads(path.read_text()).get("accuracy") if args.mode == "finetune" and path.exists() else None


def _difference(row: dict, key: str) -> str:
    return f"{row[key]['mean']:+6.2f} ± {row[key]['standard_error'] or 0:4.2f}" if key in row else "-"


if __name__ == "__main__":
    main()
