"""Serving's accuracy-latency frontier: LOTUS's ways of serving a ViT cheaper beside ToMe's.

From one baseline checkpoint (`lotus train`), every model is fine-tuned for the same --finetune-epochs at the same recipe (the baseline's, at half its
learning rate), so no point gains by training longer than another:
- dense: on every patch (the control: what the extra epochs alone give);
- tickets: on attention tickets at --ticket-drop (`lotus tickets` defaults), as `lotus compress`
  (--no-tickets leaves them out);
- aware: drop-aware (`--drop-aware`) at --aware-drops, trained on the patches the graph keeps;
  also at each --aware-select-blocks (aware-sB: trained and exported with select block B, which
  trades how well the kept patches are chosen against how many blocks run on fewer tokens);
- structured: whole heads and MLP neurons removed, by LOTUS and by Torch-Pruning, fine-tuned on
  every patch (`benchmarks/structured_peers.py`, which must run first, gives them);
- stacked: LOTUS's structured model fine-tuned drop-aware, served int8;
- distilled (--teachers): aware and stacked again, each also learning a teacher's predictions on
  every whole training image (`--distill`, weight --distill-weight). Teacher `baseline`: the model
  they start from, so no point has seen more than the baseline and its one fine-tuning. Teacher
  `dense` (models named `...-distilled-dense`): the dense model after its own fine-tuning, a
  stronger teacher that has trained --finetune-epochs more, so its points are compared apart. Each step
  also runs the teacher, which the records' epoch seconds show.
Each is exported to ONNX and served at every --drops ratio; dense, aware, LOTUS's structured and
stacked (and the distilled ones) also as int8, which times as the dense (or structured) int8 graph.
ToMe (`lotus.merge`, training-free token merging) runs on the dense model at each --merges
(tokens merged per block) through its exported graph, fp32 and int8, so that each way of cutting
tokens is compared with and without int8.

Accuracy is measured on the validation split (which choices read: "the best point under a
latency" is chosen there) and on the test split (reported). Latency is ONNX Runtime's on this
machine at batch 1 and 64; weights do not change it, so one graph per architecture and precision
is timed: every (graph, setting, batch) cell once per round, in shuffled order, the median over
--rounds kept, as a fraction of the dense fp32 graph's at the same batch. PyTorch timings of
dense, dropping and merging are taken beside them.

    lotus train --data data/cifar10 --depth 6 --epochs 3 --out runs/frontier/cifar10/baseline
    python benchmarks/structured_peers.py --baseline runs/frontier/cifar10/baseline
    python benchmarks/frontier.py --baseline runs/frontier/cifar10/baseline

Runs and graphs go beside the baseline; every stage is skipped when its output exists, and
every accuracy already measured on a graph is read back from `graphs/accuracy.json`. A second
--seed fine-tunes every model again beside the first (`ft-dense-seed1`, `graphs-seed1/`), the
structured ones taken from structured_peers.py's run of that seed:

    python benchmarks/structured_peers.py --baseline runs/frontier/cifar10/baseline --seeds 0,1
    python benchmarks/frontier.py --baseline runs/frontier/cifar10/baseline --seed 1 --name frontier_cifar10_seed1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, finetune, shown, time_rounds, write_result

from lotus.checkpoint import load_model
from lotus.data import DataConfig, load_split_for_model
from lotus.drop import num_keep, select_block_of
from lotus.export import ExportConfig, eval_images, export_merging, export_onnx, quantize_int8
from lotus.merge import forward_merging
from lotus.plots import pyplot
from lotus.runtime import graph_feed, ort_session
from lotus.tickets import TicketConfig, tickets_from_checkpoint
from lotus.train import TrainConfig

TARGETS = (0.8, 0.65, 0.5)  # latencies (fraction of dense fp32, batch 64) the best points are compared at


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def seeded(name: str, seed: int) -> str:
    """A run or graph folder's name for `seed`: seed 0's keep their plain names, others run beside them."""
    return f"{name}-seed{seed}" if seed else name


def finetuned_models(args, data_cfg: DataConfig, baseline: Path) -> dict[str, dict]:
    """Every fine-tuned model of the frontier: name -> the fine-tuning record (its run folder...)."""
    _, meta = load_model(baseline)
    base = TrainConfig(**{k: v for k, v in meta["train"].items() if k in TrainConfig.__dataclass_fields__})
    peers_file = RESULTS / f"{args.peers}.json"
    if not peers_file.is_file():
        raise SystemExit(f"{peers_file} is missing: run benchmarks/structured_peers.py --baseline {baseline} first")
    peers = json.loads(peers_file.read_text())
    epochs, seed, w = args.finetune_epochs, args.seed, baseline.parent
    structured = {}
    for library in ("lotus", "torch-pruning"):
        runs = [r for r in peers["finetune"]["runs"][library] if r["seed"] == seed]
        if not runs:
            raise SystemExit(
                f"{peers_file} has no {library} model fine-tuned with seed {seed}: rerun structured_peers.py with {seed} in --seeds"
            )
        structured[f"structured-{library}"] = runs[0]

    def tune(start, name: str, **changes) -> dict:
        return finetune(start, data_cfg, base, w / seeded(f"ft-{name}", seed), epochs, seed=seed, **changes)

    models = {"dense": tune(baseline, "dense")}
    if args.tickets:
        tickets = w / f"tickets-d{args.ticket_drop}"
        if not (tickets / "tickets.json").is_file():
            tickets_from_checkpoint(baseline, data_cfg, TicketConfig(drop=args.ticket_drop), tickets)
        models["tickets"] = tune(baseline, f"tickets-d{args.ticket_drop}", tickets=tickets)
    models["aware"] = tune(baseline, "aware", drop_aware=tuple(args.aware_drops))
    for block in args.aware_select_blocks:
        run = tune(baseline, f"aware-s{block}", drop_aware=tuple(args.aware_drops), select_block=block)
        models[f"aware-s{block}"] = {**run, "select_block": block}
    models.update(structured)
    pruned = next(
        r for r in peers["pruned"] if r["library"] == "lotus" and r["importance"] == peers["chosen_by_validation"]["lotus"]
    )
    models["stacked"] = tune(pruned["checkpoint"], "stacked", drop_aware=tuple(args.aware_drops))
    for teacher in args.teachers:
        path = baseline if teacher == "baseline" else Path(models["dense"]["run"])
        taught = {"drop_aware": tuple(args.aware_drops), "distill": str(path), "distill_weight": args.distill_weight}
        for name, start in (("aware", baseline), ("stacked", pruned["checkpoint"])):
            model = f"{name}-distilled{TEACHERS[teacher]}"
            models[model] = {**tune(start, model, **taught), "teacher": teacher}
    return models


TEACHERS = {"baseline": "", "dense": "-dense"}  # --teachers -> the suffix of the models each teaches
DISTILLED = [f"{m}-distilled{s}" for s in TEACHERS.values() for m in ("aware", "stacked")]
INT8 = ("dense", "aware", "structured-lotus", "stacked", *DISTILLED)  # the models also served int8


def export_all(models: dict[str, dict], merges: list[int], folder: Path) -> dict[str, Path]:
    """ONNX graphs: each model fp32 (drop as an input), those of INT8 also int8, ToMe per merge."""
    folder.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for name, record in models.items():
        path = folder / f"{name}.onnx"
        if not path.is_file():
            export_onnx(record["run"], path, None, ExportConfig(verify=False, select_block=record.get("select_block")))
        graphs[name] = path
    for name in [n for n in INT8 if n in graphs]:
        path = folder / f"{name}-int8.onnx"
        if not path.is_file():
            quantize_int8(graphs[name], path)
        graphs[f"{name}-int8"] = path
    dense, _ = load_model(models["dense"]["run"])
    for r in merges:
        path, int8 = folder / f"tome-r{r}.onnx", folder / f"tome-r{r}-int8.onnx"
        if not path.is_file():
            export_merging(dense.float().eval(), r, path)
        if not int8.is_file():
            quantize_int8(path, int8)
        graphs[f"tome-r{r}"], graphs[f"tome-r{r}-int8"] = path, int8
    return graphs


# graph name -> (family on the frontier, the graph timed for it, served at every drop ratio?);
# weights do not change latency, so graphs of the same architecture and precision share timings
SERVED = {
    "dense": ("dense", "dense", True),  # fine-tuned on every patch, served dropping all the same
    "tickets": ("tickets", "dense", True),
    "aware": ("aware", "dense", True),
    "structured-lotus": ("structured-lotus", "structured-lotus", True),
    "structured-torch-pruning": ("structured-torch-pruning", "structured-lotus", False),
    "dense-int8": ("int8", "dense-int8", True),
    "aware-int8": ("aware-int8", "dense-int8", True),
    "stacked-int8": ("stacked", "stacked-int8", True),
    "structured-lotus-int8": ("structured-lotus-int8", "stacked-int8", True),  # stacked without drop-aware training
    **{d: (d, "dense", True) for d in DISTILLED if d.startswith("aware")},
    **{f"{d}-int8": (f"{d}-int8", "dense-int8", True) for d in DISTILLED if d.startswith("aware")},
    **{f"{d}-int8": (d, "stacked-int8", True) for d in DISTILLED if d.startswith("stacked")},  # int8 only, as stacked
}


def points(graphs: dict[str, Path], drops: list[float]) -> list[dict]:
    """Every (graph, setting) the frontier shows."""
    out = []
    for name, path in graphs.items():
        if name.startswith("tome-r"):
            family, merge = ("tome-int8", name[6:-5]) if name.endswith("-int8") else ("tome", name[6:])
            out.append({"model": name, "family": family, "timed": name, "drop": 0.0, "merge": int(merge), "graph": path})
        elif name.startswith("aware-s"):  # its own select block: its own timings
            out += [{"model": name, "family": name, "timed": name, "drop": d, "merge": 0, "graph": path} for d in drops]
        elif name in SERVED:  # the stacked fp32 graph is a step on the way to its int8 one
            family, timed, every_drop = SERVED[name]
            for drop in drops if every_drop else [0.0]:
                out.append({"model": name, "family": family, "timed": timed, "drop": drop, "merge": 0, "graph": path})
    return out


def accuracy(session, images: torch.Tensor, labels: torch.Tensor, drop: float | None, batch: int = 256) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        feed = graph_feed(session, images[i : i + batch].numpy(), drop or 0.0)  # merging graphs take no drop
        correct += int((session.run(None, feed)[0].argmax(-1) == labels[i : i + batch].numpy()).sum())
    return 100.0 * correct / len(images)


def measure_accuracy(rows: list[dict], splits: dict[str, tuple[torch.Tensor, torch.Tensor]], cache: Path) -> None:
    """Each row's accuracy on each split; a graph's figures are kept in `cache` under its file's
    name and modification time, so a rerun measures only new or rewritten graphs."""
    known, sessions = json.loads(cache.read_text()) if cache.is_file() else {}, {}
    for row in rows:
        graph = Path(row["graph"])
        drop = None if row["family"].startswith("tome") else row["drop"]
        for split, (images, labels) in splits.items():
            key = f"{graph.name}|{graph.stat().st_mtime_ns}|{drop}|{split}"
            if key not in known:
                if graph not in sessions:
                    sessions[graph] = ort_session(graph, providers=["CPUExecutionProvider"])
                known[key] = accuracy(sessions[graph], images, labels, drop)
                cache.write_text(json.dumps(known, indent=1))
            row[f"{split}_accuracy"] = known[key]
        print(
            f"{row['model']:>24} drop {row['drop']:<4} r {row['merge']:<2} val {row['val_accuracy']:6.2f} test {row['test_accuracy']:6.2f}",
            flush=True,
        )


def timing_cells(rows: list[dict], dense_model, threads: int, select_block: int) -> dict[tuple, callable]:
    """(engine, graph or method, setting) -> a call on a batch of images, one per distinct timing."""
    calls, sessions = {}, {}
    for row in rows:
        if row["timed"] != row["model"]:
            continue
        session = sessions.setdefault(row["graph"], ort_session(row["graph"], threads, ["CPUExecutionProvider"], spinning=False))
        feed = {} if row["family"].startswith("tome") else {"drop": np.array(row["drop"], dtype=np.float32)}
        calls[("onnxruntime", row["timed"], row["drop"])] = lambda x, s=session, f=feed: s.run(None, {"pixel_values": x, **f})
    n = dense_model.patch_embed.num_patches
    for drop in sorted({r["drop"] for r in rows}):
        keep = num_keep(n, drop)
        calls[("torch", "dense", drop)] = lambda x, k=keep: dense_model.forward_dropping(x, k, select_block)
    for r in sorted({r["merge"] for r in rows if r["merge"]}):
        calls[("torch", f"tome-r{r}", 0.0)] = lambda x, r=r: forward_merging(dense_model, x, r)
    return calls


def attach_latency(rows: list[dict], times: dict[tuple, list[float]], batches: list[int]) -> None:
    """Each row's median latency and its fraction of dense's; beside it, the quartiles of the
    fractions single rounds gave (the row and dense timed in the same round), which say how far a
    pick's place against a target latency can be trusted."""
    for row in rows:
        row["latency_ms"], row["fraction_of_dense"], row["fraction_of_dense_quartiles"] = {}, {}, {}
        for b in batches:
            mine, dense = times[(("onnxruntime", row["timed"], row["drop"]), b)], times[(("onnxruntime", "dense", 0.0), b)]
            median = statistics.median(mine)
            row["latency_ms"][str(b)] = median * 1000
            row["fraction_of_dense"][str(b)] = median / statistics.median(dense)
            per_round = [m / d for m, d in zip(mine, dense)]
            q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            row["fraction_of_dense_quartiles"][str(b)] = [q1, q3]


def best_under(rows: list[dict], target: float, batch: str) -> dict | None:
    """The point with the best validation accuracy among `rows` at or under `target` latency."""
    fast = [r for r in rows if r["fraction_of_dense"][batch] <= target]
    return max(fast, key=lambda r: r["val_accuracy"]) if fast else None


def matched(rows: list[dict], batch: str = "64") -> list[dict]:
    """At each target latency, the best point of: every LOTUS point (Torch-Pruning's is a peer's;
    those distilled from the fine-tuned dense model apart, with them) and ToMe's with or without
    int8; patch dropping alone and ToMe alone (fp32, the dense architecture: like for like)."""
    untouched = [r for r in rows if r["model"] in ("dense", "dense-int8") and r["drop"] == 0.0]  # r 0, drop 0
    taught = [r for r in rows if not r["family"].startswith("tome") and r["family"] != "structured-torch-pruning"]
    lotus = [r for r in taught if "distilled-dense" not in r["family"]]  # a teacher that trained longer: apart
    fp32 = [r for r in lotus if not r["family"].endswith("-int8")]
    dropping = [r for r in fp32 if r["family"] in ("tickets", "dense") or r["family"].startswith("aware")]
    tome_any = [r for r in rows if r["family"].startswith("tome")] + untouched
    tome = [r for r in tome_any if r["family"] in ("tome", "dense")]
    out = []
    for target in TARGETS:
        picks = {
            "lotus": best_under(lotus, target, batch),
            "lotus_dense_teacher": best_under(taught, target, batch) if len(taught) > len(lotus) else None,
            "tome_any": best_under(tome_any, target, batch),
            "dropping": best_under(dropping, target, batch),
            "tome": best_under(tome, target, batch),
        }
        out.append(
            {
                "target": target,
                **{
                    name: None
                    if p is None
                    else {k: p[k] for k in ("model", "drop", "merge", "val_accuracy", "test_accuracy")}
                    | {"fraction_of_dense": p["fraction_of_dense"][batch]}
                    | {"fraction_of_dense_quartiles": p["fraction_of_dense_quartiles"][batch]}
                    for name, p in picks.items()
                },
            }
        )
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, batch in zip(axes, ("1", "64")):
        for family in sorted({r["family"] for r in rows}):
            mine = sorted(
                (r for r in rows if r["family"] == family), key=lambda r: (r["drop"], r["merge"])
            )  # lines follow the setting
            ax.plot([r["fraction_of_dense"][batch] for r in mine], [r["test_accuracy"] for r in mine], marker="o", label=family)
        ax.set_xlabel(f"ONNX Runtime latency, fraction of dense fp32 (batch {batch})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=Path("runs/frontier/cifar10/baseline"), help="The trained baseline run.")
    p.add_argument("--name", default="frontier_cifar10", help="Result name under benchmarks/results.")
    p.add_argument("--peers", default="structured_peers", help="structured_peers.py's result name.")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--ticket-drop", type=float, default=0.5)
    p.add_argument(
        "--tickets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Fine-tune on tickets too (a scoring pass and one more fine-tuning).",
    )
    p.add_argument(
        "--teachers",
        type=lambda s: [v for v in s.split(",") if v],
        default=["baseline"],
        help="Fine-tune aware and stacked again distilled from each (two fine-tunings each): baseline, dense; '' for none.",
    )
    p.add_argument("--distill-weight", type=float, default=0.5)
    p.add_argument("--aware-drops", type=floats, default=[0.3, 0.5, 0.7])
    p.add_argument("--aware-select-blocks", type=lambda s: [int(v) for v in s.split(",") if v], default=[0])
    p.add_argument("--drops", type=floats, default=[0.0, 0.1, 0.3, 0.5, 0.7])
    p.add_argument("--merges", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 6, 8, 10])
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="Fine-tuning seed; another than 0 runs beside seed 0's as ...-seedN.")
    args = p.parse_args()
    if set(args.teachers) - TEACHERS.keys():
        p.error(f"--teachers {','.join(args.teachers)}: each must be one of {', '.join(TEACHERS)}")

    torch.set_num_threads(args.threads)
    _, base_meta = load_model(args.baseline)
    data_cfg = DataConfig(**base_meta["data"])  # as the baseline was trained: the same folder and validation hold-out
    models = finetuned_models(args, data_cfg, args.baseline)
    folder = args.baseline.parent / seeded("graphs", args.seed)
    graphs = export_all(models, args.merges, folder)
    rows = points(graphs, args.drops)
    dense, meta = load_model(models["dense"]["run"])
    pre = meta["preprocess"]
    splits = {s: eval_images(load_split_for_model(data_cfg, pre, s), pre) for s in ("val", "test")}
    measure_accuracy(rows, splits, folder / "accuracy.json")
    select_block = select_block_of(len(dense.blocks), None)
    calls = timing_cells(rows, dense.float().eval(), args.threads, select_block)
    times = time_rounds(calls, args.batch_sizes, pre["img_size"], args.rounds)
    medians = {cell: statistics.median(t) for cell, t in times.items()}
    attach_latency(rows, times, args.batch_sizes)
    for row in rows:
        row["graph"] = shown(row["graph"])
    torch_rows = [
        {
            "method": key[1],
            "drop": key[2],
            "batch": b,
            "median_ms": s * 1000,
            "fraction_of_dense": s / medians[(("torch", "dense", 0.0), b)],
        }
        for (key, b), s in medians.items()
        if key[0] == "torch"
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / f"{args.name}.png", f"{args.name}: accuracy against ONNX Runtime latency")
    write_result(
        args.name,
        {
            "data": data_cfg.name,
            "model": f"{base_meta['model']['name']}, depth {len(dense.blocks)}, img {pre['img_size']}, {dense.patch_embed.num_patches} patches",
            "select_block": select_block,
            "baseline": {
                "run": str(args.baseline),
                "train": base_meta["train"],
                "test_accuracy": base_meta["metrics"]["test_accuracy"],
            },
            "finetune_epochs": args.finetune_epochs,
            "seed": args.seed,
            "teachers": args.teachers,
            "finetuned": models,
            "points": rows,
            "matched_latency": matched(rows),
            "torch_latency": torch_rows,
            "threads": args.threads,
            "rounds": args.rounds,
        },
    )


if __name__ == "__main__":
    main()
