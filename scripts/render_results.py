"""Write docs/results.md, its images and README's headline block from benchmarks/results/.

Every figure on the page is read or computed (means, standard deviations, paired differences,
ratios) from the JSON files the benchmarks in benchmarks/ wrote; the PNGs the page shows are
copied byte for byte into docs/img/results/ (mkdocs serves only docs/), and one headline picture
is drawn from the same data into docs/img/headline.png. Inputs are read in sorted order and every
number has a fixed format, so the same results always give the same text. Needs no GPU, no
network and no ../shared.

    python scripts/render_results.py            # (re)write the page, the images and README's block
    python scripts/render_results.py --check    # exit 1 when any of them is out of date
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FIX = "make results"
PAGE = "results.md"  # under docs/
IMG_DIR = "img/results"  # copies of the benchmarks' PNGs, under docs/
HEADLINE_PNG = "img/headline.png"  # drawn here, under docs/
START, END = "<!-- results:headline:start -->", "<!-- results:headline:end -->"

# Facts the JSON files do not record, kept in one place.
DEFAULT_SELECT_BLOCK = 2  # lotus.export: depth // 6, block 2 of ViT-Tiny's 12
# The one `lotus compress` run whose dense/lottery step ratio was timed on the fine-tuning GPU;
# the other GPU runs' reports timed it on the host's busy CPU.
STEP_RATIO_ON_DEVICE = "h200/cifar10_compress_s0.3-isp0.5-d0.3.json"
# Quoted from the source paper (not measured here): test accuracy after each stage of its pruning.
PAPER = {
    "stage1": "about 79% at 30% one-shot",
    "isp": "about 50% after two-stage pruning",
    "finetune": "near its best by epoch 5",
}
SCORERS = {"selector20": "from a 20-epoch scorer"}  # ticket runs scored by another baseline, by its run folder
DATASETS = {"cifar10": "CIFAR-10", "tiny-imagenet-100": "Tiny-ImageNet-100"}  # data folder -> its name on the page
GPU_FOLDERS = {"h200": "NVIDIA H200", "h100": "NVIDIA H100"}  # where a JSON file records no machine
# LOTUS's rows of a structured_peers*.json that does not say `lotus_scores: torch-pruning` were measured
# with the head and neuron scores lotus/structured.py computed by hand at this commit.
HANDWRITTEN_SCORES = "084d74c"

# A ticket run's variant (see `variant`) -> its name on the page, in the order the tables list them.
LABELS = {
    "full": "full data",
    "attention-cls": "attention, last block (`--layers -1`)",
    "attention-cls-all": "attention, all blocks averaged (the default scoring)",
    "attention-cls-all-balance": "attention, all blocks, positions balanced (`--balance`)",
    "random": "random drop, fixed per image (the default)",
    "attention-cls-t1": "attention, last block, sampled every batch (T = 1)",
    "attention-cls-t3": "attention, last block, sampled every batch (T = 3)",
    "attention-rollout": "attention rollout, all blocks",
    "attention-rollout-blocks0.1.2": "attention rollout, blocks 0-2",
    "attention-cls-blocks2": "attention of block 2 (the exporter's select block)",
    "attention-cls-all-spread2": "attention, all blocks, kept in 2x2 groups (`--spread 2`)",
    "attention-cls-selector20": "attention, last block, from a 20-epoch scorer",
    "attention-cls-all-selector20": "attention, all blocks, from a 20-epoch scorer",
    "attention-cls-all-t1": "attention, all blocks, sampled every batch (T = 1)",
    "attention-cls-all-fuse": "attention, all blocks, dropped patches fused into one token (`--fuse`)",
    "random-t1": "random drop, re-drawn every batch",
    "random-fuse": "random drop, dropped patches fused into one token (`--fuse`)",
}
MAIN_VARIANTS = ("full", "attention-cls", "attention-cls-all", "attention-cls-all-balance", "random")

# The serving runs shown, in column order (the model, its settings and the day are in each file).
SERVE_RUNS = (
    "serve_latency_fp32.json",
    "serve_latency_int8.json",
    "serve_latency_fp32-binary.json",
    "serve_latency_fp32-sbs.json",
    "serve_latency_fp32-spin.json",
)


# ---------------------------------------------------------------- numbers and Markdown


def dataset_name(folder: str | Path) -> str:
    name = Path(folder).name
    return DATASETS.get(name, name)


def num(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def signed(value: float) -> str:
    text = f"{value:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: list[float], digits: int = 2) -> str:
    """'low-high' of a list of per-round figures."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


# CPU latency ratios move with these extensions (docs/export.md); older result files do not record them
CPU_EXTENSIONS = {"avx512_vnni": "AVX-512 VNNI", "amx_int8": "AMX"}


def cpu_extensions(info: dict) -> list[str]:
    return [name for flag, name in CPU_EXTENSIONS.items() if flag in info.get("cpu_features", [])]


def machine(data: dict, rel: str) -> str:
    """The machine a result file records: GPU name or CPU threads, and torch."""
    info = data.get("machine") or data.get("accuracy_machine") or data.get("latency_machine")
    if not info:
        return GPU_FOLDERS.get(rel.split("/")[0], "not recorded")
    torch = str(info.get("torch", "?")).split("+")[0]
    if info.get("gpu"):
        return f"{info['gpu']} (torch {torch})"
    features = "/".join(cpu_extensions(info))
    model = f" ({info['cpu_model']}{', ' + features if features else ''})" if info.get("cpu_model") else ""
    return f"{info.get('cpu', 'CPU')} CPU{model}, {info.get('torch_threads', '?')} threads (torch {torch})"


# ---------------------------------------------------------------- inputs and the page


class Source:
    """The results folder; each JSON file is parsed once."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, dict] = {}

    def has(self, *rels: str) -> bool:
        return all((self.root / rel).is_file() for rel in rels)

    def json(self, rel: str) -> dict:
        if rel not in self._cache:
            self._cache[rel] = json.loads((self.root / rel).read_text())
        return self._cache[rel]

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.glob(pattern) if p.is_file())

    def machines(self, rels: Iterable[str]) -> str:
        return "; ".join(sorted({machine(self.json(rel), rel) for rel in rels}))


@dataclass
class Page:
    """The Markdown lines of docs/results.md and the PNGs they link (docs-relative copy -> results-relative source)."""

    lines: list[str] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def about(self, machines: str, budget: str) -> None:
        self.add(f"_Machine:_ {machines}. _Budget:_ {budget}.", "")

    def table(self, header: list[str], rows: list[list[str]], rels: Iterable[str]) -> None:
        self.add(*table(header, rows), sources(rels), "")

    def image(self, src: Source, rel: str, alt: str) -> None:
        if src.has(rel):
            dest = f"{IMG_DIR}/{rel.replace('/', '-')}"
            self.images[dest] = rel
            self.add(f"![{alt}]({dest})", "", f"_{alt}_ (`benchmarks/results/{rel}`)", "")


def sources(rels: Iterable[str]) -> str:
    """'Source:' and the files, grouped by folder."""
    by_folder: dict[str, list[str]] = {}
    for rel in sorted(set(rels)):
        folder, _, name = rel.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    parts = []
    for folder, names in by_folder.items():
        prefix = f"benchmarks/results/{folder}/" if folder else "benchmarks/results/"
        if len(names) == 1:
            parts.append(f"`{prefix}{names[0]}`")
        else:
            parts.append(f"`{prefix}`: " + ", ".join(f"`{name}`" for name in names))
    return "_Source:_ " + "; ".join(parts) + "."


# ---------------------------------------------------------------- ticket runs


@dataclass(frozen=True)
class Run:
    """One model trained (or fine-tuned) on one kind of data: a file under */*_tickets*/."""

    rel: str
    machine: str  # GPU name, or CPU
    variant: str
    drop: float
    seed: int
    gpu: bool
    accuracy: float  # test accuracy after the last epoch, %
    epochs: int
    batch_size: int
    epoch_seconds: float  # mean wall time of an epoch


def variant(data: dict) -> str:
    """How a run chose its patches, as a key of LABELS: select, scoring, options, scorer."""
    select = data["select"]
    if select == "full":
        return "full"
    parts = [select]
    if select == "attention":
        parts.append(data.get("method") or "cls")
        layers = data.get("layers")
        if layers is not None:
            parts.append("all" if layers == "all" else "blocks" + ".".join(str(layer) for layer in layers))
        if (data.get("spread") or 1) > 1:
            parts.append(f"spread{data['spread']}")
        if data.get("balance"):
            parts.append("balance")
        scorer = Path(str(data.get("baseline") or "")).name
        if scorer in SCORERS:
            parts.append(scorer)
    if data.get("temperature"):
        parts.append(f"t{data['temperature']:g}")
    if data.get("fuse"):
        parts.append("fuse")
    return "-".join(parts)


def label(key: str) -> str:
    return LABELS.get(key, key)


def load_runs(src: Source, pattern: str) -> list[Run]:
    runs = []
    for rel in src.glob(pattern):
        data = src.json(rel)
        history = data["history"]
        train = data.get("train") or data["finetune"]
        seconds = [epoch["epoch_seconds"] for epoch in history]
        runs.append(
            Run(
                rel=rel,
                machine=short_machine(data, rel),
                variant=variant(data),
                drop=float(data["drop"]),
                seed=int(data.get("seed", train.get("seed", 0))),
                gpu=bool((data.get("machine") or {}).get("gpu")),
                accuracy=history[-1]["test_accuracy"],
                epochs=len(history),
                batch_size=train["batch_size"],
                epoch_seconds=statistics.fmean(seconds),
            )
        )
    return runs


def by_cell(runs: list[Run]) -> dict[tuple[str, float], list[Run]]:
    cells: dict[tuple[str, float], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.variant, r.drop, r.seed, r.rel)):
        cells.setdefault((run.variant, run.drop), []).append(run)
    return cells


def stat_cell(runs: list[Run] | None) -> str:
    """'mean ± sd (n seeds)', or the one value."""
    if not runs:
        return ""
    if len(runs) == 1:
        return num(runs[0].accuracy)
    mean, sd = mean_sd([r.accuracy for r in runs])
    return f"**{mean:.2f}** ± {sd:.2f} ({len(runs)} seeds)"


def runs_cell(runs: list[Run] | None) -> str:
    """Every run's value by seed, and their mean when there are several."""
    if not runs:
        return ""
    values = ", ".join(num(r.accuracy) for r in runs)
    if len(runs) == 1:
        return values
    return f"{values} (mean {statistics.fmean(r.accuracy for r in runs):.2f})"


def difference(runs: list[Run], reference: list[Run]) -> str:
    """Mean difference to the reference, with its standard error when both have several seeds."""
    mean, sd = mean_sd([r.accuracy for r in runs])
    ref_mean, ref_sd = mean_sd([r.accuracy for r in reference])
    if len(runs) < 2 or len(reference) < 2:
        return f"{signed(mean - ref_mean)} (one seed)"
    stderr = (sd**2 / len(runs) + ref_sd**2 / len(reference)) ** 0.5
    return f"{signed(mean - ref_mean)} ± {stderr:.2f}"


def drops_of(cells: dict[tuple[str, float], list[Run]], variants: Iterable[str]) -> list[float]:
    wanted = set(variants)
    return sorted({drop for (key, drop) in cells if key in wanted and drop > 0})


def budget_of(runs: list[Run], what: str) -> str:
    epochs = "/".join(str(e) for e in sorted({r.epochs for r in runs}))
    batch = "/".join(str(b) for b in sorted({r.batch_size for r in runs}))
    unit = "epoch" if epochs == "1" else "epochs"
    return f"{epochs} {unit} {what}, batch {batch}; seeds as counted in each cell"


# ---------------------------------------------------------------- sections


def baselines(src: Source, page: Page) -> None:
    files = (
        ("cifar10_baseline.json", "CIFAR-10: the base of the exported and served model"),
        ("h200/cifar10_baseline.json", "CIFAR-10: scores the tickets, is pruned by the GPU pipeline runs"),
        ("h200/cifar10_baseline_20.json", "CIFAR-10: the stronger scorer"),
        ("h100/cluttered64_baseline.json", "CIFAR-10 in clutter: scores its tickets"),
    )
    present = [(rel, what) for rel, what in files if src.has(rel)]
    if not present:
        return
    page.add(
        "## The baselines the other results start from",
        "",
        "ViT-Tiny (12 blocks, 3 heads, width 192) trained from scratch with AdamW and a cosine schedule;"
        " the other results prune these models or use them to score patches.",
        "",
    )
    rows = []
    for rel, what in present:
        data = src.json(rel)
        train, epochs = data["train"], data["epochs"]
        budget = f"{train['epochs']} epochs, batch {train['batch_size']}, warm-up {train['warmup_epochs']:g} epoch"
        rows.append([what, f"`{data['model']}`", budget, pct(epochs[-1]["test_accuracy"]), machine(data, rel)])
    page.table(["baseline", "model", "budget", "test accuracy", "machine"], rows, [rel for rel, _ in present])


def step_cost(src: Source, page: Page) -> None:
    if not src.has("token_gather_step.json"):
        return
    page.add("## Does dropping patches make a training step cheaper?", "")
    data = src.json("token_gather_step.json")
    page.about(
        machine(data, "token_gather_step.json"),
        f"`{data['model']}`, batch {data['batch_size']}, one training step per keep ratio in each of"
        f" {data['rounds']} rounds taken side by side, the median step kept",
    )
    rows = [
        [
            num(row["keep_ratio"], 1),
            str(row["num_keep"]),
            num(row["token_ratio"], 3),
            num(row["step_seconds"], 3),
            f"**{row['fraction_of_dense']:.3f}**",
        ]
        for row in data["rows"]
    ]
    header = ["patches kept (ratio)", "patches kept", "tokens vs all (with the class token)", "step (s)", "step vs all patches"]
    page.table(header, rows, ["token_gather_step.json"])
    page.add("A step costs what its tokens cost: the token-gathering forward skips the dropped patches entirely.", "")
    epochs_side_by_side(src, page)
    scoring_cost(src, page)
    gpu_step_cost(src, page)


def epochs_side_by_side(src: Source, page: Page) -> None:
    rels = src.glob("epoch_time_*.json")
    if not rels:
        return
    page.add(
        "### Whole epochs, side by side",
        "",
        "`benchmarks/epoch_time.py` trains one epoch on full data and one on tickets at each drop ratio in every"
        " round, in a shuffled order, through `lotus train`'s own path (loading, augmentation, the tickets'"
        " indices moved with each crop); a round's ratios are taken between its own epochs.",
        "",
    )
    for rel in rels:
        data = src.json(rel)
        model, recipe, rounds = data["model"], data["recipe"], data["rounds"]
        patches = data["summary"]["full"]["patches_kept"]
        page.add(f"**{dataset_name(data['data'])}**", "")
        page.about(
            src.machines([rel]),
            f"{len(rounds)} rounds; ViT-Tiny of depth {model['depth']}, {model['img_size']} px,"
            f" {patches} patches; batch {recipe['batch_size']}",
        )
        rows = [
            [
                "full data" if setting == "full" else f"tickets, {setting}",
                str(row["patches_kept"]),
                f"{row['epoch_seconds']:.0f}",
                f"**{row['vs_full_wall']:.3f}** / {row['vs_full_cpu']:.3f}",
                ", ".join(f"{r:.3f}" for r in row["vs_full_wall_per_round"]),
            ]
            for setting, row in data["summary"].items()
        ]
        header = [
            "trained on",
            "patches kept",
            "epoch wall (s, median)",
            "vs full data (wall / CPU, median)",
            "wall ratio per round",
        ]
        page.table(header, rows, [rel])


def scoring_cost(src: Source, page: Page) -> None:
    rel = "tickets_scoring_speed.json"
    if not src.has(rel):
        return
    data = src.json(rel)
    page.add(
        "### What scoring the tickets costs",
        "",
        "Tickets are scored once, by one forward pass of the baseline over the training set.",
        "",
    )
    page.about(machine(data, rel), f"{data['batches']} batches of {data['batch_size']} images per mode")
    names = {
        "eval": "plain evaluation pass",
        "score_cls": "class-token attention score",
        "score_rollout": "attention rollout score",
    }
    rows = [
        [names.get(mode, mode), f"{row['images_per_second']:.0f}", num(row["vs_eval"], 3)] for mode, row in data["modes"].items()
    ]
    page.table(["pass", "images/s", "vs evaluation"], rows, [rel])


def gpu_step_cost(src: Source, page: Page) -> None:
    rel = STEP_RATIO_ON_DEVICE
    if not src.has(rel):
        return
    data = src.json(rel)
    metrics = data["metrics"]
    page.add(
        "### On a GPU",
        "",
        "`lotus compress` times a dense and a lottery fine-tuning step side by side on the fine-tuning device"
        " and prices dense fine-tuning from their ratio. ViT-Tiny at batch 128 is bound by kernel launches on"
        " a large GPU, so fewer patches save little there; the savings above are the CPU's.",
        "",
    )
    page.about(
        machine(data, rel),
        f"{data['recipe']['finetune']['epochs']} fine-tuning epochs, batch {data['recipe']['finetune']['batch_size']}",
    )
    lottery, dense = metrics["finetune_train_seconds"], metrics["dense_finetune_seconds_estimate"]
    row = [
        f"drop {metrics['drop']:g} ({metrics['patches_kept']} of {metrics['patches']} patches)",
        f"{lottery:.1f}",
        f"{dense:.1f}",
        f"**{dense / lottery:.2f}x**",
    ]
    page.table(["fine-tuned on", "lottery fine-tuning (s)", "dense, estimated (s)", "dense / lottery"], [row], [rel])


def selection_table(
    src: Source, page: Page, runs: list[Run], variants: Iterable[str], extra: tuple[str, Callable[[str], str]] | None = None
) -> None:
    """One row per way of choosing patches, one column per drop ratio: mean ± sd over seeds."""
    cells = by_cell(runs)
    present = [key for key in variants if any(k == key for k, _ in cells)]
    drops = drops_of(cells, present)
    header = ["trained on", "no drop", *(f"drop {drop:g}" for drop in drops)]
    rows = []
    for key in present:
        rows.append([label(key), stat_cell(cells.get((key, 0.0))), *(stat_cell(cells.get((key, drop))) for drop in drops)])
        if extra:
            rows[-1].append(extra[1](key))
    if extra:
        header.append(extra[0])
    page.table(header, rows, [r.rel for r in runs if r.variant in present])


def differences_table(page: Page, runs: list[Run], variants: Iterable[str], reference: str = "random") -> None:
    """Each selection's mean minus the reference's, per drop ratio, with the standard error."""
    cells = by_cell(runs)
    drops = sorted(drop for key, drop in cells if key == reference)
    rows = []
    for key in variants:
        if key in (reference, "full"):
            continue
        row = [f"{label(key)} minus {label(reference)}"]
        row += [difference(cells[(key, d)], cells[(reference, d)]) if (key, d) in cells else "" for d in drops]
        if any(row[1:]):
            rows.append(row)
    if rows:
        page.add(*table(["difference (points of test accuracy)", *(f"drop {d:g}" for d in drops)], rows))
        page.add(
            "_Source:_ the runs of the table above. ± is the standard error of the difference of two means;"
            " a difference smaller than about twice it is no lead.",
            "",
        )


def per_machine(runs: list[Run], key: str) -> str:
    """A variant's mean accuracy on each machine, per drop ratio, where it ran on more than one."""
    parts = []
    for drop in sorted({r.drop for r in runs if r.variant == key}):
        found: dict[str, list[float]] = {}
        for run in runs:
            if run.variant == key and run.drop == drop:
                found.setdefault(run.machine, []).append(run.accuracy)
        if len(found) > 1:
            means = ", ".join(f"{statistics.fmean(v):.2f} on the {name} ({len(v)} seeds)" for name, v in sorted(found.items()))
            parts.append(f"drop {drop:g}: {means}")
    return "; ".join(parts)


def tickets_cifar10(src: Source, page: Page) -> None:
    runs = load_runs(src, "**/cifar10_tickets/epochs*/*.json")
    gpu = [r for r in runs if r.gpu]
    if not gpu:
        return
    page.add(
        "## Do attention tickets train better than random drop?",
        "",
        "A fresh ViT-Tiny is trained from scratch on each kind of data with the same recipe: whole images, or"
        " each image's tickets (the patches its class-token attention ranks highest in the 12-epoch baseline),"
        " or as many patches kept at random. Accuracy is on the 10,000 whole test images after the last epoch.",
        "",
    )
    page.about(src.machines(r.rel for r in gpu), budget_of(gpu, "from scratch on CIFAR-10 (50,000 training images)"))
    selection_table(src, page, gpu, MAIN_VARIANTS)
    differences_table(page, gpu, MAIN_VARIANTS)
    by_gpu = per_machine(gpu, "random")
    if by_gpu:
        page.add(f"Seeds from the two GPUs are pooled (same code, same torch build). Random drop's mean by GPU: {by_gpu}.", "")
    for drop in (0.3, 0.5):
        page.image(
            src,
            f"h100/cifar10_tickets/epochs5/curves-drop{drop:g}.png",
            f"Accuracy and loss per epoch at drop {drop:g}, seed means",
        )
    other_selections(src, page, gpu)
    cpu_selections(src, page, [r for r in runs if not r.gpu])
    keep_accuracy(src, page)


def other_selections(src: Source, page: Page, runs: list[Run]) -> None:
    others = [r for r in runs if r.variant not in MAIN_VARIANTS]
    if not others:
        return
    page.add("### Other ways of choosing the patches", "")
    page.about(src.machines(r.rel for r in others), budget_of(others, "from scratch, as above") + "; every run listed by seed")
    cells = by_cell(others)
    order = [key for key in LABELS if key not in MAIN_VARIANTS] + sorted({r.variant for r in others} - set(LABELS))
    present = [key for key in order if any(k == key for k, _ in cells)]
    drops = drops_of(cells, present)
    rows = [[label(key), *(runs_cell(cells.get((key, drop))) for drop in drops)] for key in present]
    page.table(["trained on", *(f"drop {drop:g}" for drop in drops)], rows, [r.rel for r in others])


def cpu_selections(src: Source, page: Page, runs: list[Run]) -> None:
    if not runs:
        return
    page.add("### On the CPU", "")
    page.about(src.machines(r.rel for r in runs), budget_of(runs, "from scratch on CIFAR-10"))
    order = list(LABELS) + sorted({r.variant for r in runs} - set(LABELS))
    cells = by_cell(runs)
    rows = [
        [label(key), f"{drop:g}", runs_cell(found)] for key in order for (k, drop), found in sorted(cells.items()) if k == key
    ]
    page.table(["trained on", "drop", "test accuracy"], rows, [r.rel for r in runs])


def keep_accuracy(src: Source, page: Page) -> None:
    rels = src.glob("tickets_keep_accuracy*.json")
    if not rels:
        return
    first = src.json(rels[0])
    page.add(
        "### Do the scores find the informative patches?",
        "",
        "The trained baseline classifies every test image from K of its patches only, chosen four ways."
        " Good scores put the highest-scored patches above random ones and the lowest-scored below.",
        "",
    )
    page.about(
        src.machines(rels),
        f"the 12-epoch baseline ({pct(first['accuracy']['full'])} on whole images), all {first['test_images']:,} test images",
    )
    rows = []
    for rel in rels:
        data = src.json(rel)
        accuracy = data["accuracy"]
        for drop in sorted({float(key.split("-")[1]) for key in accuracy if "-" in key}):
            values = [accuracy[f"{how}-{drop:g}"] for how in ("highest", "spread", "random", "lowest")]
            best = max(values)
            rows.append([scoring_label(data), f"{drop:g}", *(f"**{v:.2f}**" if v == best else num(v) for v in values)])
    header = ["scoring", "drop", "K highest (the tickets)", "highest, in 2x2 groups", "K random", "K lowest"]
    page.table(header, rows, rels)


def scoring_label(data: dict) -> str:
    method, layers = data.get("method") or "cls", data.get("layers")
    if method == "rollout":
        return "attention rollout, all blocks" if layers is None else f"attention rollout, blocks {layers}"
    if layers is None:
        return "class token, last block (`--layers -1`)"
    if layers == "all":
        return "class token, all blocks averaged (the default scoring)"
    return "class token, block " + ", ".join(str(layer) for layer in layers)


def object_coverage(src: Source) -> dict[str, str]:
    """Variant -> 'share of the object's patches kept at each drop', from the coverage files."""
    kept: dict[tuple[str, float], list[float]] = {}
    for rel in src.glob("**/cluttered64_coverage.json"):
        for ticket in src.json(rel)["tickets"].values():
            config = ticket["config"]
            kept.setdefault((variant(config), float(config["drop"])), []).append(ticket["object_kept"])
    out: dict[str, str] = {"full": "all"}
    for (key, drop), values in sorted(kept.items()):
        cell = f"{100 * statistics.fmean(values):.1f}% at {drop:g}"
        out[key] = f"{out[key]}, {cell}" if key in out else cell
    return out


def tickets_clutter(src: Source, page: Page) -> None:
    runs = load_runs(src, "**/cluttered64_tickets/epochs*/*.json")
    if not runs:
        return
    page.add(
        "## Do attention tickets train better where background fills the image?",
        "",
        "CIFAR-10's objects fill their 32x32 images, so there is little background for attention to drop."
        " `benchmarks/cluttered_cifar10.py` pastes every CIFAR-10 image at a random spot on a 64x64 canvas tiled"
        " with crops of other images of the same split (as in cluttered MNIST) and records where the object lies."
        " With 8x8 patches a model again sees 64 patches. Tickets come from a baseline trained on the cluttered data.",
        "",
    )
    coverage_files = src.glob("**/cluttered64_coverage.json")
    notes = []
    if src.has("h100/cluttered64_baseline.json"):
        notes.append(f"the baseline reaches {pct(src.json('h100/cluttered64_baseline.json')['epochs'][-1]['test_accuracy'])}")
    if coverage_files:
        notes.append(f"the object covers {100 * src.json(coverage_files[0])['object_share']:.1f}% of an image's patches")
    if notes:
        page.add("On the cluttered test set " + "; ".join(notes) + ".", "")
    page.about(src.machines(r.rel for r in runs), budget_of(runs, "from scratch on cluttered CIFAR-10 (50,000 training images)"))
    coverage = object_coverage(src)
    variants = ("full", "attention-cls-all", "attention-cls", "random")
    selection_table(src, page, runs, variants, extra=("object patches kept", lambda key: coverage.get(key, "")))
    if coverage_files:
        page.add(sources(coverage_files).replace("_Source:_", "_Object coverage:_"), "")
    differences_table(page, runs, variants)
    page.image(
        src,
        "h100/cluttered64_tickets/tickets-attention-0.5-layersall.png",
        "Cluttered test images, all-blocks tickets at drop 0.5 (grey: dropped)",
    )
    page.image(
        src, "h100/cluttered64_tickets/tickets-attention-0.5-lastblock.png", "The same images, last-block tickets at drop 0.5"
    )


PHOTO_SELECTIONS = {
    "last": "class token, last block (`--layers -1`)",
    "all": "class token, all blocks averaged (the default scoring)",
    "rollout": "attention rollout, all blocks (`--method rollout`)",
    "grad": "gradient-weighted rollout, all blocks (`--method grad`)",
    "balance": "class token, all blocks, positions balanced (`--balance`)",
    "random": "random drop, fixed per image (the default)",
    "centre": "the patches nearest the centre (looks at no image)",
    "full": "full data",
    "dense": "full data, the dense baseline (not pruned)",
}


def tickets_photos(src: Source, page: Page) -> None:
    survey = "ticket_coverage_tiny_imagenet.json"
    grids = photo_grids(src)
    if not src.has(survey) and not grids:
        return
    page.add(
        "## Do attention tickets find the object in photographs?",
        "",
        "Tiny-ImageNet-100 (100 Tiny-ImageNet classes, 64x64 photographs with real background) gives every image"
        " its object box. With 8x8 patches a model sees 64 patches, as on CIFAR-10.",
        "",
    )
    if src.has(survey):
        photo_coverage(src, page, survey)
    if src.has("scorer_coverage_tiny_imagenet.json"):
        photo_scorer(src, page, "scorer_coverage_tiny_imagenet.json")
    for rel in grids:
        photo_grid(src, page, rel)
    if src.has("ticket_views_tiny_imagenet.json"):
        photo_views(src, page, "ticket_views_tiny_imagenet.json")


def photo_grids(src: Source) -> list[str]:
    """The Tiny-ImageNet-100 tickets grids, the one whose scorer trained least first."""
    return sorted(src.glob("tiny_imagenet_tickets_*.json"), key=lambda rel: src.json(rel)["baseline_epochs"])


def photo_coverage(src: Source, page: Page, rel: str) -> None:
    data = src.json(rel)
    selections = data["selections"]
    random = selections.get("random", {}).get("drops", {})
    page.add(
        f"### How much of the object each selection keeps\n\n`benchmarks/ticket_coverage.py` scores {data['images']:,}"
        f" training images with a box (drawn once, the same for every selection) with the baseline `{data['baseline']}`"
        f" ({pct(data.get('baseline_test_accuracy'))} test)."
        f" The object touches {100 * data['object_share']:.1f}% of an image's patches on average; {data['small_objects']:,}"
        ' images have an object on fewer than half of them ("small"). Shares are of the object\'s patches that the'
        " selection keeps.",
        "",
    )
    page.about(src.machines([rel]), f"one scoring pass per selection over {data['images']:,} images of the training split")
    drops = sorted({float(d) for s in selections.values() for d in s["drops"]})
    rows = []
    for name, found in selections.items():
        cells = []
        for drop in drops:
            shares = found["drops"][f"{drop:g}"]
            versus = ""
            if name != "random" and f"{drop:g}" in random:
                versus = f" ({signed(100 * (shares['object_kept'] - random[f'{drop:g}']['object_kept']))})"
            cells.append(f"{100 * shares['object_kept']:.1f}%{versus}")
        half = found["drops"].get("0.5")
        small = f"{100 * half['small_object_kept']:.1f}%" if half else ""
        rows.append([PHOTO_SELECTIONS.get(name, name), *cells, small, f"{found['scoring_seconds']:.0f}"])
    header = ["selection", *(f"object kept, drop {d:g}" for d in drops), "small objects kept, drop 0.5", "scoring (s)"]
    page.table(header, rows, [rel])
    page.add("In brackets: points above random drop at the same ratio.", "")


def photo_scorer(src: Source, page: Page, rel: str) -> None:
    """Object coverage of the scorer as it stood after each epoch of a longer training."""
    data = src.json(rel)
    train, shape = data["train"], data["model"]
    names = list(data["epochs"][0]["selections"])
    drop = sorted(data["epochs"][0]["selections"][names[0]]["drops"])[0]
    rows = []
    for e in data["epochs"]:
        kept = {n: 100 * e["selections"][n]["drops"][drop]["object_kept"] for n in names}
        random = kept.get("random", 100 * (1 - float(drop)))  # measured on the same images, else its expectation
        cells = [f"{kept[n]:.1f}%" + ("" if n == "random" else f" ({signed(kept[n] - random)})") for n in names]
        rows.append([str(e["epoch"]), pct(e["val_accuracy"]), pct(e["test_accuracy"]), *cells])
    versus = (
        "random drop on the same images"
        if "random" in names
        else f"random drop, which keeps {100 * (1 - float(drop)):.0f}% of any object in expectation"
    )
    page.add(
        "### Does a better-trained scorer find more of the object?",
        "",
        f"`benchmarks/scorer_coverage.py` trains a baseline of the same shape (ViT-Tiny of depth {shape['depth']},"
        f" {shape['patch_size']}-px patches) for {train['epochs']} epochs (one cosine schedule) and scores the same"
        f" {data['images']:,} boxed training images with the model as it stood after each epoch. Shares are of the"
        f" object's patches kept at drop {float(drop):g}; in brackets, points above {versus}.",
        "",
    )
    page.about(
        src.machines([rel]),
        f"{train['epochs']} epochs of training, batch {train['batch_size']}; one scoring pass per epoch and selection",
    )
    header = ["after epoch", "validation accuracy", "test accuracy", *(PHOTO_SELECTIONS.get(n, n) for n in names)]
    page.table(header, rows, [rel])


def photo_grid(src: Source, page: Page, rel: str) -> None:
    data = src.json(rel)
    recipe = data["recipe"]
    shape = data["baseline_model"]
    base = (
        f"the baseline (ViT-Tiny of depth {shape['depth']}, {shape['patch_size']}-px patches, {data['baseline_epochs']} epochs,"
        f" {pct(data['baseline_test_accuracy'])} test)"
    )
    if data["mode"] == "finetune":
        pruned = f" ({pct(data['pruned_test_accuracy'])} test)" if data.get("pruned_test_accuracy") else ""
        what = (
            f"{base[0].upper() + base[1:]} is pruned one-shot to sparsity {data['sparsity']:g}{pruned} and fine-tuned"
            f" {recipe['epochs']} epoch(s) with `lotus compress`'s recipe (masks held)"
        )
    else:
        what = f"A fresh model of the shape of {base} is trained {recipe['epochs']} epoch(s) from scratch"
    page.add(
        (
            "### Fine-tuning the pruned model on the tickets"
            if data["mode"] == "finetune"
            else "### Training on the tickets from scratch"
        )
        + f" (a baseline of {data['baseline_epochs']} epochs)",
        "",
        f"`benchmarks/tiny_imagenet_tickets.py`. {what}, on full data or on each selection's tickets (scored once by the"
        " dense baseline; object coverage over the whole training split). Runs of one seed see the same batches, so"
        " differences are paired by seed: mean ± its standard error. Validation accuracy is on the images held out of"
        " the training split (what a choice is made on); test accuracy on the 5,000 test images (what is reported).",
        "",
    )
    runs = {row["selection"] for row in data["rows"]}
    page.about(src.machines([rel]), f"{recipe['epochs']} epoch(s), batch {recipe['batch_size']}; {len(runs)} kinds of data")
    rows = []
    for row in data["rows"]:
        kept = row.get("object_coverage", {}).get("object_kept")
        rows.append(
            [
                PHOTO_SELECTIONS.get(row["selection"], row["selection"]),
                f"{row['drop']:g}" if row["selection"] not in ("full", "dense") else "",
                str(len(row["seeds"])),
                pct(row["val_mean"]),
                pct(row["test_mean"]) + (f" ± {num(row['test_sd'])}" if row["test_sd"] is not None else ""),
                paired_cell(row, "vs_random"),
                paired_cell(row, "vs_full"),
                num(row["epoch_time_vs_full"], 3)
                if "epoch_time_vs_full" in row
                else ("1.000" if row["selection"] == "full" else ""),
                f"{100 * kept:.1f}%" if kept is not None else "",
                position_cell(row.get("position_keep_rate")),
            ]
        )
    header = [
        "trained on",
        "drop",
        "seeds",
        "validation",
        "test (mean ± sd)",
        "vs random (points)",
        "vs full (points)",
        "epoch time vs full",
        "object kept",
        "kept per position",
    ]
    page.table(header, rows, [rel])
    page.add(
        "Kept per position: over the training images, how often the least and the most kept patch"
        " positions are kept (random tickets keep every position at the keep ratio). Epoch time vs full: the"
        " mean epoch of runs made one after another on a shared machine, so it carries the machine's drift;"
        " [whole epochs, side by side](#whole-epochs-side-by-side) gives the ratio without it.",
        "",
    )


def photo_views(src: Source, page: Page, rel: str) -> None:
    data = src.json(rel)
    page.add(
        "### What the models fine-tuned on tickets have learnt to see",
        "",
        "`benchmarks/ticket_views.py` evaluates each fine-tuned model of the grid above on the test images seen"
        " three ways: whole; only the patches the baseline's every-block attention keeps at the drop ratio the model"
        " trained at; and only as many patches kept at random. A model trained on attention tickets that is behind on"
        " whole images but ahead on attention-kept views has learnt its tickets' kind of view, and misses the patches"
        " attention drops when evaluation shows them.",
        "",
    )
    page.about(src.machines([rel]), f"{len(data['runs'])} fine-tuned models, three passes each over the test split")
    rows = [
        [
            PHOTO_SELECTIONS.get(r["selection"], r["selection"]),
            f"{r['drop']:g}",
            str(r["seed"]),
            *(pct(r["accuracy"][v]) for v in ("whole", "attention", "random")),
        ]
        for r in sorted(data["runs"], key=lambda r: (r["drop"], r["seed"], r["selection"]))
    ]
    header = ["trained on", "drop", "seed", "whole images", "attention-kept patches", "random-kept patches"]
    page.table(header, rows, [rel])
    lines = []
    for drop, views in data["attention_minus_random"].items():
        cells = [f"{view} {paired_cell(views, view)}" for view in ("whole", "attention", "random") if views.get(view)]
        seeds = max(v["seeds"] for v in views.values() if v)
        lines.append(f"- drop {drop} ({seeds} seed(s)): " + "; ".join(cells))
    page.add("Attention-trained minus random-trained, paired by seed, in points:", "", *lines, "")


def position_cell(rate: dict | None) -> str:
    return f"{100 * rate['min']:.0f}-{100 * rate['max']:.0f}%" if rate else ""


def paired_cell(row: dict, key: str) -> str:
    """'mean ± standard error' of a paired difference, or '' when the row has none."""
    if key not in row:
        return ""
    error = row[key]["standard_error"]
    return f"{signed(row[key]['mean'])} " + (f"± {num(error)}" if error is not None else "(one seed)")


def tickets_finetune(src: Source, page: Page) -> None:
    folders = sorted({rel.rsplit("/", 1)[0] for rel in src.glob("**/cifar10_tickets_finetune/*/*.json")})
    for folder in folders:
        runs = load_runs(src, f"{folder}/*.json")
        first = src.json(runs[0].rel)
        page.add(
            "## Does fine-tuning a pruned model on tickets cost accuracy?",
            "",
            "Where `lotus compress` uses tickets: the pruned model is fine-tuned on them. The 12-epoch baseline is"
            f" pruned one-shot to sparsity {first['sparsity']:g} ({pct(first['pruned_accuracy'])}), then that same model"
            " is fine-tuned with `lotus compress`'s fine-tuning recipe (masks held) on each kind of data; tickets from"
            " the dense baseline's attention, all blocks.",
            "",
        )
        page.about(src.machines(r.rel for r in runs), budget_of(runs, "of fine-tuning on CIFAR-10 (50,000 training images)"))
        cells = by_cell(runs)
        full = [r.accuracy for r in cells.get(("full", 0.0), [])]
        rows = [["(the pruned model, before fine-tuning)", "", pct(first["pruned_accuracy"]), "", ""]]
        for key in [k for k in LABELS if any(v == k for v, _ in cells)]:
            for (k, drop), found in sorted(cells.items()):
                if k != key:
                    continue
                mean = statistics.fmean(r.accuracy for r in found)
                versus = signed(mean - statistics.fmean(full)) if full and key != "full" else ""
                seconds = ", ".join(f"{r.epoch_seconds:.0f}" for r in found)
                rows.append([label(key), f"{drop:g}", runs_cell(found), versus, seconds])
        header = ["fine-tuned on", "drop", "test accuracy, by seed", "vs full data (points)", "epoch (s), by seed"]
        page.table(header, rows, [r.rel for r in runs])
        page.add("Epoch times come from a shared machine; some runs had tests running beside them.", "")


def compress_label(recipe: dict) -> str:
    sparsity = recipe["sparsity"]
    parts = ["sparsity " + ("auto (the knee)" if sparsity == "auto" else f"{sparsity}")]
    if recipe.get("isp_target"):
        parts.append(f"ISP to {recipe['isp_target']:g}")
    return ", ".join([*parts, f"drop {recipe['tickets']['drop']:g}"])


def pipeline_rows(runs: list[dict]) -> list[list[str]]:
    """Stage by stage, one column per `lotus compress` run, then the source paper's figures."""

    def row(name: str, cell: Callable[[dict, dict], str], paper: str = "") -> list[str]:
        return [name, *(cell(run["metrics"], run["metrics"]["stages"]) for run in runs), paper]

    def isp(m: dict, stages: dict) -> str:
        return f"{pct(stages['isp']['accuracy'])} ({m['isp_sparsity']:.4f})" if "isp" in stages else "-"

    return [
        row("dense baseline", lambda m, s: pct(m["dense_accuracy"]), "-"),
        row(
            "essential sparsity (knee of the one-shot sweep)",
            lambda m, s: "-" if m["essential_sparsity"] is None else f"{m['essential_sparsity']:g}",
        ),
        row(
            "stage 1: one-shot magnitude pruning (measured sparsity)",
            lambda m, s: f"{pct(s['prune']['accuracy'])} ({m['stage1_sparsity']:.4f})",
            PAPER["stage1"],
        ),
        row("stage 2: Instant Soup Pruning (measured sparsity)", isp, PAPER["isp"]),
        row("fine-tuned on the tickets, masks held", lambda m, s: pct(s["finetune"]["accuracy"]), PAPER["finetune"]),
        row("compressed model (measured sparsity)", lambda m, s: f"**{pct(m['compressed_accuracy'])}** ({m['sparsity']:.4f})"),
        row("compressed minus dense (points)", lambda m, s: f"**{signed(m['compressed_accuracy'] - m['dense_accuracy'])}**"),
    ]


def pipeline(src: Source, page: Page) -> None:
    rels = src.glob("*/cifar10_compress_*.json")
    if not rels:
        return
    runs = [src.json(rel) for rel in rels]
    recipe = runs[0]["recipe"]
    isp = next((run["recipe"]["isp"] for run in runs if run["recipe"].get("isp_target")), None)
    page.add(
        "## How far can ISSP prune? The whole pipeline against the source paper",
        "",
        "`lotus compress` from the 12-epoch baseline, run to its end: tickets, stage 1 (one-shot global magnitude"
        " pruning of the blocks' Linear weights, at a given sparsity or at the knee of a sweep), stage 2 (Instant"
        " Soup Pruning to the target), fine-tuning on the tickets with the masks held, evaluation on whole images.",
        "",
    )
    budget = f"fine-tuning {recipe['finetune']['epochs']} epochs, batch {recipe['finetune']['batch_size']}"
    if isp:
        budget += (
            f"; ISP: {isp['rounds']} rounds of {isp['copies']} weak copies, each trained {isp['epochs']} epoch on its own"
            f" {100 * isp['data_fraction']:.0f}% of the training data, masks merged by {isp['merge']}, weights souped"
        )
    page.about(src.machines(rels), budget)
    header = ["step", *(compress_label(run["recipe"]) for run in runs), "source paper (reported)"]
    page.table(header, pipeline_rows(runs), rels)
    page.add(
        "The baseline's cosine schedule ended at its last epoch and fine-tuning adds more epochs, which explains"
        " the gain over dense: these runs show that pruning to these sparsities costs little, not that it adds"
        " accuracy (a dense model fine-tuned as long was not run). The full report of each run (`report.md`,"
        " `metrics.json`, `recipe.yaml`, plots) is in `benchmarks/results/h200/compress/`.",
        "",
    )
    page.image(
        src, "h200/compress/auto-isp0.5-d0.3/sweep.png", "The one-shot sweep of the knee run: test accuracy against sparsity"
    )
    page.image(src, "h200/compress/s0.3-isp0.5-d0.3/finetune.png", "Fine-tuning the 0.5-sparse model on the tickets, per epoch")


def latency_cell(latency: dict, name: str) -> str:
    """Median of the rounds' ratios to dense, and the range of those ratios."""
    rounds = [m / d for m, d in zip(latency[name]["round_medians_ms"], latency["dense"]["round_medians_ms"])]
    return f"**{latency[name]['vs_dense_fp32']:.3f}** (rounds {spread(rounds, 3)})"


def structured_latency_rows(data: dict, only_dropping: bool = False) -> list[list[str]]:
    params, size, ratio = data["parameters"], data["onnx_bytes"], data["size_vs_dense"]
    latency, accuracy = data["latency"], data["accuracy_before_finetune"]
    block = DEFAULT_SELECT_BLOCK if data.get("select_block") is None else data["select_block"]
    rows = [
        [
            "dense",
            f"{params['dense'] / 1e6:.2f} M",
            mb(size["dense"]),
            f"1 ({latency['dense']['median_ms']:.0f} ms)",
            pct(accuracy["dense"]),
        ],
        [
            f"unstructured {100 * data['unstructured_sparsity']:.1f}% (same non-zero count)",
            f"{params['unstructured_nonzero'] / 1e6:.2f} M non-zero",
            f"{mb(size['unstructured'])} ({ratio['unstructured']:.2f}x)",
            "- (dense kernels)",
            pct(accuracy["unstructured"]),
        ],
        [
            f"shrunk ({data['importance']} importance)",
            f"{params['shrunk'] / 1e6:.2f} M ({params['shrunk'] / params['dense']:.3f}x)",
            f"{mb(size['shrunk'])} ({ratio['shrunk']:.3f}x)",
            latency_cell(latency, "shrunk"),
            pct(accuracy["shrunk"]),
        ],
    ]
    for name in sorted(latency):
        if name.startswith("shrunk_"):
            what = name.replace("_int8", " + int8").replace("_drop", " + drop ")
            file = f"{mb(size['shrunk_int8'])} ({ratio['shrunk_int8']:.3f}x)" if "int8" in name else ""
            rows.append([f"{what} (select block {block})", "", file, latency_cell(latency, name), ""])
    return [row for row in rows if not only_dropping or "select block" in row[0]]


def structured(src: Source, page: Page) -> None:
    rels = [rel for rel in ("cifar10_structured.json", "cifar10_structured_select0.json") if src.has(rel)]
    if not rels:
        return
    data = src.json(rels[0])
    config = data["structured"]["config"]
    page.add(
        "## Structured pruning: a smaller model, not just zeros",
        "",
        f"Remove {config['heads']:.0%} of the heads and {config['mlp']:.0%} of every MLP's hidden neurons"
        f" ({config['importance']} importance from {config['calib_images']} calibration images), against unstructured"
        " one-shot magnitude pruning with as many non-zero parameters. Unstructured zeros do not shrink the ONNX file"
        " nor speed ONNX Runtime's dense kernels; a shrunk model does both.",
        "",
    )
    runs = len(data["latency"]["dense"]["round_medians_ms"])
    page.about(
        src.machines(rels),
        f"the 3-epoch CPU baseline; ONNX Runtime at batch {data['latency_batch']}, {runs} rounds, median of the rounds' ratios to dense",
    )
    rows = structured_latency_rows(data) + [row for rel in rels[1:] for row in structured_latency_rows(src.json(rel), True)]
    page.table(["model", "parameters", "ONNX file", "latency vs dense fp32", "accuracy before fine-tuning"], rows, rels)
    structured_importance(src, page)
    structured_finetune(src, page)
    structured_peers(src, page)


def structured_importance(src: Source, page: Page) -> None:
    rels = [rel for rel in ("cifar10_structured.json", "h200/cifar10_structured_accuracy.json") if src.has(rel)]
    if not rels:
        return
    page.add("### Which importance score chooses what to remove", "")
    page.about(src.machines(rels), "accuracy right after shrinking, no fine-tuning, on all 10,000 test images")
    rows = []
    for rel in rels:
        data = src.json(rel)
        scores = data["shrunk_accuracy_by_importance"]
        best = max(scores.values())
        cells = [f"**{pct(v)}**" if v == best else pct(v) for v in scores.values()]
        rows.append([pct(data["accuracy_before_finetune"]["dense"]), *cells, machine(data, rel)])
    header = ["dense baseline", *scores, "machine"]
    page.table(header, rows, rels)


def structured_finetune(src: Source, page: Page) -> None:
    rel = "h200/cifar10_structured_accuracy.json"
    if not src.has(rel):
        return
    data = src.json(rel)
    extra = src.glob("h200/cifar10_structured/*.json")
    train = src.json(extra[0])["train"] if extra else None
    epochs = len(next(iter(data["finetune"].values())))
    page.add("### After fine-tuning", "", "Both pruned models fine-tuned on full data with the same recipe.", "")
    budget = f"the 12-epoch baseline; {epochs} epochs of fine-tuning" + (
        f", batch {train['batch_size']}, lr {train['lr']:g}" if train else ""
    )
    page.about(machine(data, rel), budget)
    params, before = data["parameters"], data["accuracy_before_finetune"]
    counts = {
        "shrunk": f"{params['shrunk'] / 1e6:.2f} M",
        "unstructured": f"{params['unstructured_nonzero'] / 1e6:.2f} M non-zero",
    }
    rows = [["dense", f"{params['dense'] / 1e6:.2f} M", pct(before["dense"]), *[""] * epochs]]
    for name, curve in data["finetune"].items():
        rows.append([name, counts.get(name, ""), pct(before[name]), *(num(v) for v in curve[:-1]), f"**{curve[-1]:.2f}**"])
    page.table(["model", "parameters", "after pruning", *(f"epoch {i + 1}" for i in range(epochs))], rows, [rel, *extra])


def structured_peers(src: Source, page: Page) -> None:
    """LOTUS's structured pruning beside Torch-Pruning's at the same widths and fine-tuning budget."""
    rels = src.glob("structured_peers*.json")
    if not rels:
        return
    config = src.json(rels[0])["config"]
    page.add(
        "### Beside Torch-Pruning",
        "",
        f"`benchmarks/structured_peers.py` removes {config['heads']:.0%} of every block's heads and {config['mlp']:.0%} of"
        " its MLP neurons with LOTUS's importance scores and with Torch-Pruning's (`MetaPruner`, whole heads, the"
        " residual width kept), so every pruned model has the same widths and parameters. Each library's best score on"
        " the validation split is then fine-tuned on full data. LOTUS's `magnitude` and `taylor` scores are"
        " Torch-Pruning's own since a run below found them better than the ones LOTUS computed by hand; the surgery"
        " and `activation` are still LOTUS's.",
        "",
    )
    for rel in rels:
        structured_peers_run(src, page, rel)


def structured_peers_run(src: Source, page: Page, rel: str) -> None:
    data = src.json(rel)
    config, ft = data["config"], data["finetune"]
    seeds = ", ".join(map(str, ft["seeds"]))
    handwritten = config.get("lotus_scores") != "torch-pruning"
    page.add(
        f"#### {dataset_name(data.get('data') or Path(data['baseline']).parent)}"  # older files name only the baseline
        + (", LOTUS's hand-written scores" if handwritten else "")
        + (f", {ft['epochs']} fine-tuning epochs" if ft["epochs"] > 1 else ""),
        "",
        (
            f"LOTUS's rows are the scores it computed by hand at commit `{HANDWRITTEN_SCORES}`."
            if handwritten
            else "LOTUS's magnitude and Taylor rows are Torch-Pruning's scores through LOTUS's surgery."
        ),
        "",
    )
    page.about(
        machine(data, rel),
        f"the baseline `{data['baseline']}` ({pct(data['baseline_test_accuracy'])} test); "
        f"{config['calib_images']} calibration images; {ft['epochs']} epoch(s) of fine-tuning at half the baseline's"
        f" learning rate, seed{'s' if len(ft['seeds']) > 1 else ''} {seeds}",
    )
    chosen = data["chosen_by_validation"]
    rows = [
        [
            r["library"] + (" (chosen)" if chosen[r["library"]] == r["importance"] else ""),
            r["importance"],
            f"{r['parameters'] / 1e6:.2f} M",
            pct(r["val_accuracy"]),
            pct(r["test_accuracy"]),
        ]
        for r in data["pruned"]
    ]
    page.table(["library", "importance", "parameters", "val, before fine-tuning", "test, before fine-tuning"], rows, [rel])
    cells = []
    for lib, runs in ft["runs"].items():
        mean, sd = mean_sd([r["test_accuracy"] for r in runs])
        cells.append([lib, chosen[lib], f"{num(mean)} ± {num(sd)} ({len(runs)} seeds)" if len(runs) > 1 else pct(mean)])
    page.table(["library", "importance", f"test after {ft['epochs']} epoch(s) of fine-tuning"], cells, [rel])
    if not handwritten and chosen["lotus"] == chosen["torch-pruning"]:
        page.add("Both libraries chose the same score, which cuts the same model: one fine-tuning serves both.", "")
        return
    diff = data["torch_pruning_minus_lotus"]
    if diff["standard_error"] is None:
        page.add(f"Torch-Pruning minus LOTUS after fine-tuning: {signed(diff['mean'])} points (one seed: no standard error).", "")
    else:
        page.add(
            f"Torch-Pruning minus LOTUS after fine-tuning, paired by seed: {signed(diff['mean'])} ± "
            f"{num(diff['standard_error'])} points (mean ± standard error).",
            "",
        )


FRONTIER_FAMILIES = {
    "dense": "dense model, served dropping",
    "tickets": "fine-tuned on tickets, served dropping",
    "aware": "fine-tuned drop-aware, served dropping (default select block)",
    "int8": "dense int8, served dropping",
    "structured-lotus": "structured (LOTUS), served dropping",
    "structured-torch-pruning": "structured (Torch-Pruning)",
    "stacked": "stacked: structured + drop-aware + int8",
    "structured-lotus-int8": "structured (LOTUS), served int8 dropping (stacked without drop-aware training)",
    "aware-int8": "fine-tuned drop-aware, served int8",
    "aware-distilled": "fine-tuned drop-aware, distilled from the baseline",
    "aware-distilled-int8": "fine-tuned drop-aware, distilled, served int8",
    "stacked-distilled": "stacked, distilled from the baseline",
    "aware-distilled-dense": "fine-tuned drop-aware, distilled from the fine-tuned dense model",
    "aware-distilled-dense-int8": "fine-tuned drop-aware, distilled from the fine-tuned dense model, served int8",
    "stacked-distilled-dense": "stacked, distilled from the fine-tuned dense model",
    "tome": "ToMe (token merging), r per block",
    "tome-int8": "ToMe, int8",
}
# frontier_*.json's matched_latency keys -> their columns, in order (older files lack tome_any)
FRONTIER_MATCHED = {
    "lotus": "LOTUS, any point",
    "lotus_dense_teacher": "LOTUS, taught by the fine-tuned dense model",
    "tome_any": "ToMe, fp32 or int8",
    "dropping": "LOTUS, dropping only (fp32)",
    "tome": "ToMe (fp32)",
}


def frontier(src: Source, page: Page) -> None:
    """Accuracy against ONNX Runtime latency for every way of serving cheaper, ToMe beside them."""
    rels = src.glob("frontier_*.json")
    if not rels:
        return
    page.add(
        "## Serving's accuracy-latency frontier, beside ToMe",
        "",
        "`benchmarks/frontier.py` fine-tunes every model from one baseline for the same epochs, then serves each through"
        " its exported ONNX graph: patch dropping at every ratio, int8, structured pruning (LOTUS and Torch-Pruning),"
        " the three stacked, and ToMe's token merging (written here from the paper and exported to ONNX) on the dense"
        " model. Distilled models also learned a teacher's predictions on whole images (`--distill`): the baseline"
        " every model starts from (none has then seen more), or the dense model after its own fine-tuning (which has"
        " trained longer: those points are compared apart). Latency is ONNX Runtime's, as a fraction of the dense fp32 graph"
        " at the same batch.",
        "",
    )
    for rel in rels:
        frontier_run(src, page, rel)


def frontier_tables(page: Page, points: list[dict], rel: str) -> None:
    """One row per way of serving, one column per drop ratio (ToMe: per r): test accuracy and
    latency at batch 64; batch 1 and validation accuracy are in the JSON."""
    page.add("Each cell: test accuracy, then ONNX Runtime latency at batch 64 as a fraction of dense fp32.", "")
    for kind, key in (("drop", "drop"), ("r", "merge")):
        mine = [p for p in points if p["family"].startswith("tome") == (kind == "r")]
        settings = sorted({p[key] for p in mine})
        rows = []
        for family in dict.fromkeys(p["family"] for p in mine):
            cells = {
                p[key]: f"{pct(p['test_accuracy'])} · {num(p['fraction_of_dense']['64'])}x" for p in mine if p["family"] == family
            }
            rows.append([frontier_family(family), *(cells.get(v, "") for v in settings)])
        page.table(["model", *(f"{kind} {v:g}" for v in settings)], rows, [rel])


def frontier_family(family: str) -> str:
    if family.startswith("aware-s"):  # drop-aware at another select block than the default
        return f"fine-tuned drop-aware at select block {family[7:]}, served so"
    return FRONTIER_FAMILIES.get(family, family)


def frontier_setting(row: dict) -> str:
    return f"r {row['merge']}" if row["merge"] else f"drop {row['drop']:g}"


def frontier_latency(pick: dict) -> str:
    """A matched-latency pick's median fraction of dense, and where runs record them, the quartiles
    of single rounds' fractions: a pick whose quartiles cross the target could land either side."""
    quartiles = pick.get("fraction_of_dense_quartiles")
    rounds = f"; rounds {quartiles[0]:.2f}-{quartiles[1]:.2f}" if quartiles else ""
    return f"{num(pick['fraction_of_dense'], 2)}x{rounds}"


def frontier_run(src: Source, page: Page, rel: str) -> None:
    data = src.json(rel)
    base = data["baseline"]
    epochs = f", {data['finetune_epochs']} fine-tuning epochs" if data["finetune_epochs"] > 1 else ""
    page.add(f"### {dataset_name(data['data'])}: {data['model']}{epochs}", "")
    page.about(
        machine(data, rel),
        f"baseline {base['train']['epochs']} epochs ({pct(base['test_accuracy'])} test), then {data['finetune_epochs']} epoch(s)"
        f" of fine-tuning for every model (seed {data.get('seed', 0)}); select block {data['select_block']}; latency: {data['threads']} threads,"
        f" median of {data['rounds']} shuffled rounds",
    )
    frontier_tables(page, data["points"], rel)
    page.add(
        "At matched latency (batch 64), the best point under each target, chosen on the validation split, its test accuracy"
        " (and, where the run recorded them, the quartiles of the fractions of dense single rounds gave):",
        "",
    )
    matched = []
    keys = [key for key in FRONTIER_MATCHED if key in data["matched_latency"][0]]
    for m in data["matched_latency"]:
        cells = [f"{m['target']:g}x"]
        for key in keys:
            p = m[key]
            cells.append(
                "none" if p is None else f"{pct(p['test_accuracy'])} ({p['model']}, {frontier_setting(p)}, {frontier_latency(p)})"
            )
        matched.append(cells)
    page.table(["latency at most", *(FRONTIER_MATCHED[key] for key in keys)], matched, [rel])
    page.image(src, rel.replace(".json", ".png"), f"{dataset_name(data['data'])}: test accuracy against ONNX Runtime latency")


def sparse24(src: Source, page: Page) -> None:
    rel = "h200/sparse24_gpu_baseline.json"
    if not src.has(rel):
        return
    data = src.json(rel)
    page.add(
        "## Does 2:4 sparsity run faster on a GPU?",
        "",
        "The baseline pruned one-shot to the 2:4 pattern, run through PyTorch's semi-structured sparse tensors"
        " against the same weights on dense kernels, the two taking turns, timed with CUDA events.",
        "",
    )
    page.about(
        machine(data, rel), f"{data['dtype']}; the 12-epoch baseline pruned one-shot to 2:4, accuracy on all 10,000 test images"
    )
    rows = [
        [
            f"ViT-Tiny forward, batch {r['batch']}",
            f"{r['dense_ms']:.2f} ms",
            f"{r['sparse24_ms']:.2f} ms",
            f"**{r['speedup']:.3f}x**",
        ]
        for r in data["rows"]
    ]
    linear = data.get("linear")
    if linear:
        n, tokens = linear["in_out"], linear["tokens"]
        rows.append(
            [
                f"one {n} x {n} Linear, {tokens} tokens",
                f"{linear['dense_ms']:.3f} ms",
                f"{linear['sparse24_ms']:.3f} ms",
                f"**{linear['speedup']:.3f}x**",
            ]
        )
    accuracy = data.get("accuracy")
    if accuracy:
        rows.append(["test accuracy of the 2:4 model", pct(accuracy["dense_bf16"]), pct(accuracy["sparse24_kernels"]), ""])
    page.table(["what", "dense kernels", "2:4 sparse kernels", "speed-up"], rows, [rel])
    page.add("Below 1x the sparse kernels are slower. LOTUS keeps 2:4 masks (`--sparsity 2:4`) but claims no 2:4 speed-up.", "")


def export(src: Source, page: Page) -> None:
    blocks_rel, model_rel = "cifar10_select_block.json", "cifar10_compress_auto-isp0.5-d0.3_select0.json"
    if not src.has(blocks_rel) and not src.has(model_rel):
        return
    page.add(
        "## Export: which block chooses the patches",
        "",
        "The exported ONNX graph runs the blocks up to its select block on every patch, lets that block's"
        " class-token attention pick the patches to keep, and runs the rest of the blocks on those only:"
        " each request chooses its own drop ratio.",
        "",
    )
    if src.has(blocks_rel):
        select_blocks(src, page, blocks_rel)
    if src.has(model_rel):
        m = src.json(model_rel)["metrics"]
        page.add(
            "### fp32 and int8 graphs",
            "",
            f"The model exported here and served below: `lotus compress` on the CPU from the 3-epoch baseline"
            f" ({pct(m['dense_accuracy'])}), pruned to sparsity {m['sparsity']:g} (essential sparsity {m['essential_sparsity']:g},"
            f" then ISP), fine-tuned on tickets at drop {m['drop']:g}: {pct(m['compressed_accuracy'])} on whole test images.",
            "",
        )
        export_int8(src, page, model_rel)


def select_blocks(src: Source, page: Page, rel: str) -> None:
    data = src.json(rel)
    accuracy, latency = data["accuracy"], data["latency"]
    rounds = len(next(iter(latency.values()))["round_medians_ms"])
    default = data.get("default_select_block", DEFAULT_SELECT_BLOCK)
    model = f"model `{data['checkpoint']}` (depth {data['depth']}); " if "depth" in data else ""
    page.about(
        src.machines([rel]),
        f"{model}accuracy on all 10,000 test images in PyTorch (which the graph matches), {pct(accuracy['dense'])} at drop 0;"
        f" ONNX Runtime latency, {rounds} rounds, the median round",
    )
    acc_drops, lat_drops = data["accuracy_drops"], data["latency_drops"]
    header = ["select block", "accuracy at drop " + " / ".join(f"{d:g}" for d in acc_drops)]
    header += [f"latency vs drop 0 at drop {d:g}: batch 1 / 64" for d in lat_drops]
    rows = []
    for block in data["blocks"]:
        name = f"**{block} (default)**" if block == default else str(block)
        cells = [" / ".join(num(accuracy[f"s{block}-d{d:g}"]) for d in acc_drops)]
        cells += [" / ".join(f"{latency[f's{block}-b{b}-d{d:g}']['vs_drop0']:.3f}" for b in (1, 64)) for d in lat_drops]
        rows.append([name, *cells])
    page.table(header, rows, [rel])
    page.add(
        "An earlier block saves more per dropped patch but chooses worse patches. Fine-tuning drop-aware at the block"
        " that serves (`--drop-aware --select-block B`) teaches the model to be judged there: the frontier below"
        " compares it at block 0 with the default.",
        "",
    )


def export_int8(src: Source, page: Page, rel: str) -> None:
    onnx = src.json(rel)["onnx"]
    first = next(iter(onnx.values()))
    runs = first["latency"][0]["runs"]
    page.about(
        src.machines([rel]),
        f"select block {first['select_block']}; all 10,000 test images; ONNX Runtime, median of {runs} runs a cell",
    )
    rows = []
    for kind, graph in onnx.items():
        drops = sorted(graph["accuracy"], key=float)
        cells = [kind, mb(graph["bytes"]), " / ".join(num(graph["accuracy"][d]) for d in drops)]
        for batch in sorted({r["batch"] for r in graph["latency"]}):
            found = sorted((r for r in graph["latency"] if r["batch"] == batch), key=lambda r: r["drop"])
            cells.append(f"{found[0]['median_ms']:.2f} ms; " + " / ".join(f"{r['vs_drop0']:.3f}" for r in found[1:]))
        rows.append(cells)
    drops = " / ".join(f"{float(d):g}" for d in sorted(first["accuracy"], key=float))
    ratios = " / ".join(f"{r['drop']:g}" for r in first["latency"] if r["batch"] == 1 and r["drop"] > 0)
    batches = sorted({r["batch"] for r in first["latency"]})
    header = ["graph", "file", f"accuracy at drop {drops}", *(f"batch {b}: drop 0; ratio at {ratios}" for b in batches)]
    page.table(header, rows, [rel])


def serve_label(data: dict) -> str:
    config = data["batching"]["config"]
    parts = ["int8" if "int8" in data["model"] else "fp32", "binary tensors" if config.get("binary") else "JSON bodies"]
    if data.get("spinning"):
        parts.append("spin-waiting threads")
    if "http_overhead_ms_per_round" in data["batching"]:
        parts.append("overhead timed per round")
    rounds = config.get("rounds") or 1
    parts.append(f"{rounds} rounds" if rounds > 1 else "cells one after another")
    return ", ".join(parts) + f" ({data['machine']['date'][:10]})"


def serve_checks(data: dict) -> list[str]:
    """One run's column of the checks table."""
    checks, batching = data["checks"], data["batching"]
    ratio = checks["p50_drop_0.5_over_drop_0"]
    overhead = f"{checks['http_overhead_ms_concurrency_1']['0.0']:.2f} ms"
    per_round = batching.get("http_overhead_ms_per_round", {}).get("0.0")
    if per_round:
        overhead += f" (rounds {spread(per_round)})"
    local = {r["drop"]: r["median_ms"] for r in batching.get("local", []) if r["batch"] == 1}
    gain = checks["throughput_gain_batching_concurrency_16"]
    gain_rounds = checks.get("throughput_gain_per_round", {}).get("0.0")
    return [
        f"{checks['errors_at_concurrency_16']} of {checks['requests_at_concurrency_16']:,}",
        " / ".join(num(ratio[c]) for c in sorted(ratio, key=int)),
        overhead,
        f"{local[0.0]:.2f} / {local[0.5]:.2f} ms" if 0.0 in local and 0.5 in local else "-",
        f"{gain['0.0']:.2f}x / {gain['0.5']:.2f}x",
        spread(gain_rounds) + "x" if gain_rounds else "-",
    ]


def serving(src: Source, page: Page) -> None:
    present = [rel for rel in SERVE_RUNS if src.has(rel)]
    if not present:
        return
    rel, first = present[0], src.json(present[0])
    config = first["batching"]["config"]
    page.add(
        "## Serving latency",
        "",
        f"`lotus serve` (uvicorn) on the compressed model above, exported with the default select block {DEFAULT_SELECT_BLOCK}"
        f" (`{first['model']}`): one server with dynamic batching,"
        " one without, loaded by `lotus bench URL` on the same machine, the machine otherwise idle. The cells"
        " (concurrency x drop) are visited round-robin, so a shared machine's drift hits every cell alike; each p50"
        " ratio to drop 0 is the median of the rounds' ratios.",
        "",
    )
    page.about(
        f"{machine(first, rel)}, {first['cores']} cores shared by the server and the load generator",
        f"{config['requests']} timed requests a cell in {config.get('rounds') or 1} rounds, {config['warmup']} warm-up requests, batch {config['batch']}",
    )
    keys = ("p50_ms", "p90_ms", "p95_ms", "p99_ms")
    rows = [
        [
            str(c["concurrency"]),
            f"{c['drop']:g}",
            *(f"{c[k]:.2f}" for k in keys),
            f"{c['throughput_rps']:.1f}",
            str(c["errors"]),
            f"**{c['p50_vs_drop0']:.2f}**",
        ]
        for c in first["batching"]["cells"]
    ]
    header = ["concurrency", "drop", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "requests/s", "errors", "p50 / drop 0"]
    page.table(header, rows, [rel])
    page.image(src, "serve_latency_fp32.png", "Latency against drop ratio, batching server")
    serving_checks(src, page, present)
    overhead_split(src, page)


def serving_checks(src: Source, page: Page, rels: list[str]) -> None:
    page.add(
        "### The same checks across runs",
        "",
        "Same model and code, runs on two consecutive days; the spread between runs is part of the result.",
        "",
    )
    page.about(src.machines(rels), "as above, per run (each column says how its cells were timed)")
    names = [
        "errors at concurrency 16",
        "p50 at drop 0.5 / at drop 0, concurrency 1 / 4 / 16",
        "HTTP overhead at concurrency 1, drop 0 (server p50 minus ONNX Runtime alone)",
        "ONNX Runtime alone, batch 1: drop 0 / drop 0.5",
        "throughput with batching / without, concurrency 16: drop 0 / drop 0.5",
        "the same at drop 0, per round (lowest-highest)",
    ]
    columns = [serve_checks(src.json(rel)) for rel in rels]
    rows = [[name, *(column[i] for column in columns)] for i, name in enumerate(names)]
    page.table(["check", *(serve_label(src.json(rel)) for rel in rels)], rows, rels)


def overhead_split(src: Source, page: Page) -> None:
    rel = "serve_overhead_split.json"
    if not src.has(rel):
        return
    data = src.json(rel)
    runs = data["runs"]
    page.add(
        "### Where the HTTP overhead goes",
        "",
        "The server's own metrics: mean request time from its first middleware, minus the mean ONNX Runtime call,"
        " in runs alternating between the served model and a one-block ViT of the same input shape.",
        "",
    )
    page.about(machine(data, rel), f"concurrency 1, drop 0, {len(runs['model'])} runs per model, alternating")
    rows = []
    for i, (model, small) in enumerate(zip(runs["model"], runs["one_block"])):
        rows.append(
            [
                str(i + 1),
                f"{model['server_around_model_ms']:.2f}",
                f"{small['server_around_model_ms']:.2f}",
                f"{model['server_onnxruntime_mean_ms']:.2f} / {model['onnxruntime_alone_mean_ms']:.2f}",
            ]
        )
    header = [
        "run",
        "around the model, served model (ms)",
        "around the model, one-block ViT (ms)",
        "served model's ONNX Runtime call: in the server / alone (ms)",
    ]
    page.table(header, rows, [rel])


def ms(stats: dict) -> str:
    """p50 / p99 / max of a latency_stats dict, in ms."""
    return f"{stats['p50_ms']:.1f} / {stats['p99_ms']:.1f} / {stats['max_ms']:.1f}"


def hostile(src: Source, page: Page) -> None:
    rel = "serve_hostile.json"
    if not src.has(rel):
        return
    data = src.json(rel)
    sections = data["sections"]
    page.add(
        "## Serving under hostile load",
        "",
        "`lotus serve` with its default limits on the synthetic ViT-Tiny (CIFAR-10's shape), attacked on loopback by"
        " `benchmarks/serve_hostile.py`, one section at a time. The load generator shares the machine's two cores with"
        " the server, so its own work (sending 200 bodies of 0.8 MB at once) is part of every latency below.",
        "",
    )
    page.about(machine(data, rel), "one run of each section; health checks every 10 ms from another thread")
    rows = hostile_memory_rows(sections["memory"]) + hostile_header_rows(sections["header"])
    rows += hostile_crowd_rows(sections["backpressure"]) + hostile_slow_rows(sections["slow_clients"])
    page.table(["case", "figure", "target"], rows, [rel])
    soak(src, page)


def soak(src: Source, page: Page) -> None:
    rel = "serve_soak.json"
    if not src.has(rel):
        return
    data = src.json(rel)
    config = data["config"]
    page.add(
        "### Ten minutes of mixed load",
        "",
        f"`benchmarks/serve_soak.py`: one `lotus serve` (the same model, header and body timeouts of"
        f" {config['header_timeout_s']:g} s) under {data['duration_s'] / 60:.0f} minutes of keep-alive clients,"
        f" {', '.join(map(str, config['concurrency']))} active in turn for {config['phase_s']} s each, sending valid infer"
        f" and classify requests; {config['hostile'] * 100:.0f}% of requests are hostile (malformed or oversize bodies,"
        " NaN, a wrong API key, image bombs, 16-bit PNGs, truncated JPEGs, a 1 MB header, slow headers and bodies,"
        " clients that leave).",
        "",
    )
    cpu = data["cpu"]
    page.about(
        machine(data, rel),
        f"one run; the server used {cpu['server_s']:.0f} s of CPU in {data['duration_s']:.0f} s on the 2 cores, the"
        f" load generator {cpu['load_generator_s']:.0f} s",
    )
    statuses = ", ".join(f"{n:.0f} x {status}" for status, n in data["server_statuses"].items())
    rows = [
        ["answers counted by the server (health checks and /metrics left out)", statuses, ""],
        ["5xx other than 503 and 504 (clients / server)", f"{data['client_5xx_other']} / {len(data['server_5xx_other'])}", "0"],
        [
            "answers no request of its kind should get; error bodies not JSON",
            f"{len(data['unexpected'])}; {len(data['error_bodies_not_json'])}",
            "0; 0",
        ],
        [
            f"RSS slope after {data['warmup_s']} s of warm-up (first / max / last RSS)",
            f"{data['rss_slope_mb_per_min']:+.2f} MB/min ({data['rss_mb']['first']:.0f} / {data['rss_mb']['max']:.0f} /"
            f" {data['rss_mb']['last']:.0f} MB)",
            "< 1 MB/min",
        ],
        ["the same from the RSS trace, after 2 minutes", f"{rss_slope(data['rss_trace_mb'], 120):+.2f} MB/min", "< 1 MB/min"],
        ["/v2/health/live, p50 / p99 / max ms", ms(data["health"]), "p99 < 50 ms"],
        [
            "valid requests answered per second; their latency p50 / p99 / max ms",
            f"{data['valid_200_per_s']:.1f}; {ms(data['valid_latency'])}",
            "",
        ],
    ]
    page.table(["measure", "figure", "target"], rows, [rel])


def rss_slope(trace: list[list[float]], after_s: float) -> float:
    """Least-squares slope, in MB/min, of the (seconds, MB) samples from `after_s` on."""
    points = [(t / 60, mb) for t, mb in trace if t >= after_s]
    mean_t = statistics.fmean(t for t, _ in points)
    mean_mb = statistics.fmean(mb for _, mb in points)
    return sum((t - mean_t) * (mb - mean_mb) for t, mb in points) / sum((t - mean_t) ** 2 for t, _ in points)


def hostile_memory_rows(memory: dict) -> list[list[str]]:
    kinds = ", ".join(memory["kinds"])
    return [
        [
            f"four 16-bit PNGs of {memory['image']} at once ({kinds}, in turn), RSS peak above before",
            f"{memory['worst_peak_minus_before_mb']:.0f} MB",
            f"<= {memory['targets']['peak_minus_before_mb']} MB",
        ],
        ["the same, RSS 5 s after the last, above before the first", f"{memory['after_minus_before_mb']:.0f} MB", "<= 50 MB"],
    ]


def hostile_header_rows(header: dict) -> list[list[str]]:
    return [
        [
            f"a {header['header_bytes'] / 2**20:.0f} MB header: answer, time to it",
            f"{header['answer']} after {header['seconds'] * 1000:.0f} ms",
            "431 within 1 s",
        ],
        ["the same: /v2/health/live meanwhile, p50 / p99 / max ms", ms(header["health_during"]), "<= 50 ms"],
    ]


def hostile_crowd_rows(crowd: dict) -> list[list[str]]:
    statuses = ", ".join(f"{n} x {status}" for status, n in crowd["statuses"].items())
    continued = crowd["expect_continue"]
    return [
        [
            f"{crowd['requests']} concurrent requests of {crowd['images_per_request']} images, queue"
            f" {crowd['queue_capacity_images']} images (the default: 2 s of work measured at startup, at most half the"
            f" deadline's), deadline {crowd['timeout_ms']:g} ms",
            statuses,
            "the excess 503, the rest answered by the deadline",
        ],
        [
            "the same: 503 latency, p50 / p99 / max ms (clients sending their 0.8 MB body), read by the load generator",
            ms(crowd["latency"]["503"]),
            "<= 50 ms",
        ],
        *arrival_row("the same: the 503s' arrival at the clients' sockets (the kernel's receive time)", crowd, "503"),
        ["the same from clients that wait for `100 Continue` (no body sent)", ms(continued["latency"]["503"]), "<= 50 ms"],
        *arrival_row("the same: arrival at the sockets", continued, "503"),
        ["one request at a time into the full queue: 503 latency, p50 / p99 / max ms", ms(crowd["probes"]["latency_503"]), ""],
        [
            "the same crowds: accepted requests answered by their deadline (else 504 at it)",
            f"{crowd['accepted_within_deadline']} + {continued['accepted_within_deadline']} with 200;"
            f" {crowd['statuses'].get('504', 0)} + {continued['statuses'].get('504', 0)} with 504",
            "",
        ],
        ["the same: 503s with `Retry-After`", f"{crowd['shed_with_retry_after']} of {crowd['statuses'].get('503', 0)}", "all"],
        [
            "the same: /v2/health/live meanwhile, p50 / p99 / max ms",
            f"{ms(crowd['health'])}; {ms(continued['health'])}",
            "p99 < 50 ms",
        ],
    ]


def arrival_row(what: str, crowd: dict, status: str) -> list[list[str]]:
    """A row for the answers' arrival at the load generator's sockets, where the run measured it."""
    arrival = crowd.get("arrival", {}).get(status)
    return [[what, ms(arrival), "<= 50 ms"]] if arrival else []


def hostile_slow_rows(slow: dict) -> list[list[str]]:
    queued = slow["queued_disconnect"]
    return [
        ["half a header, then silence", f"{slow['half_header']['answer']} after {slow['half_header']['seconds']:.2f} s", "408"],
        ["a body that stalls", f"{slow['stalled_body']['answer']} after {slow['stalled_body']['seconds']:.2f} s", "408"],
        [
            "a client that leaves mid-body: counted 499 / 5xx",
            f"{slow['mid_body_disconnect']['status_499']:g} / {slow['mid_body_disconnect']['status_5xx']:g}",
            "no 5xx",
        ],
        [
            "a client that leaves while queued: its work run",
            "yes"
            if queued["victim_inferred"]
            else f"no ({queued['images_inferred']:g} images run for {queued['images_answered']} answered)",
            "no",
        ],
    ]


def scale(src: Source, page: Page) -> None:
    """Memory of the two data paths as the data grows, and the 224-px training step with streamed data."""
    if not src.has("data_memory.json"):
        return
    page.add("## Data larger than memory: streamed from its files", "")
    data = src.json("data_memory.json")
    page.about(
        machine(data, "data_memory.json"),
        f"`lotus train` of a {data['model']} on generated 224-px JPEG folders, {data['workers']} loader workers, "
        f"stopped {data['train_seconds']:g} s into training; PSS summed over the run and its workers",
    )
    rows = [
        [
            f"{row['images']:,}",
            row["loader"],
            mb(row["decoded_bytes"]),
            mb(row["peak_pss_bytes"]),
            num(row["peak_pss_bytes"] / row["decoded_bytes"], 2),
        ]
        for row in data["rows"]
    ]
    page.table(["images", "held", "decoded uint8", "peak memory (PSS)", "peak / decoded"], rows, ["data_memory.json"])
    growth = data["growth_bytes"]
    page.add(
        f"From the smallest to the largest folder the peak grows by {mb(growth['stream'])} when streamed and by "
        f"{mb(growth['memory'])} when held in memory. The process itself (Python, torch, the model, the loader "
        "workers) takes most of the small folder's peak, so the peak over the decoded size falls towards 1 for "
        "data held in memory as the data grows: the decoded pixels are the one copy.",
        "",
    )
    for rel in src.glob("train_throughput*.json"):
        throughput(src, page, rel)


def throughput(src: Source, page: Page, rel: str) -> None:
    data = src.json(rel)
    compiled = ", torch.compile" if data["compile"] else ""
    page.add(f"### Training step at 224 px with streamed data ({data['device']})", "")
    page.about(
        machine(data, rel),
        f"batch {data['batch_size']}{compiled}, timm's RandomResizedCrop from a 224-px JPEG folder by {data['workers']} "
        f"loader workers; {data['rounds']} steps per setting, round-robin, the median kept",
    )
    rows = [
        [
            f"`{row['model']}`",
            row["setting"],
            num(row["step_seconds"], 3),
            num(row["images_per_second"], 1),
            f"**{row['fraction_of_full']:.3f}**",
        ]
        for row in data["rows"]
        if "step_seconds" in row
    ]
    page.table(["model", "setting", "step (s)", "images/s", "step vs keep 1.0"], rows, [rel])
    alone = ", ".join(f"{w} workers {num(v, 0)} images/s" for w, v in data["loader_alone_images_per_second"].items())
    waits = ", ".join(
        f"`{r['model']}` {num(r['wait_seconds_median'] * 1000, 1)} ms" for r in data["rows"] if "wait_seconds_median" in r
    )
    page.add(f"The loader alone: {alone}. Median wait for a batch during the steps: {waits}.", "")


SECTIONS = (
    baselines,
    step_cost,
    scale,
    tickets_cifar10,
    tickets_clutter,
    tickets_photos,
    tickets_finetune,
    pipeline,
    structured,
    sparse24,
    export,
    frontier,
    serving,
    hostile,
)


# ---------------------------------------------------------------- the headline: README's block and the picture

HEADLINE_COMPRESS = "h200/cifar10_compress_s0.3-isp0.5-d0.3.json"  # ISP does real work here: 0.3 -> 0.5
HEADLINE_SERVE = "serve_latency_fp32.json"


def short_machine(data: dict, rel: str) -> str:
    info = data.get("machine") or data.get("latency_machine") or {}
    if info.get("gpu"):
        return " ".join(str(info["gpu"]).split()[:2])  # "NVIDIA H100 80GB HBM3" -> "NVIDIA H100"
    if not info:
        return GPU_FOLDERS.get(rel.split("/")[0], "not recorded")
    extensions = cpu_extensions(info)
    return f"CPU{' (' + ', '.join(extensions) + ')' if extensions else ''}, {info['torch_threads']} threads"


def ticket_headline(src: Source, suite: str, drop: float) -> list[str] | None:
    runs = load_runs(src, f"**/{suite}/epochs*/*.json")
    cells = by_cell([r for r in runs if r.gpu])
    attention, random = cells.get(("attention-cls-all", drop)), cells.get(("random", drop))
    if not attention or not random:
        return None
    a, r = (statistics.fmean(x.accuracy for x in found) for found in (attention, random))
    full = cells.get(("full", 0.0))
    figure = f"{a:.2f}% vs {r:.2f}% ({signed(a - r)})" + (
        f"; full data {statistics.fmean(x.accuracy for x in full):.2f}%" if full else ""
    )
    where = "CIFAR-10 in clutter" if "cluttered" in suite else "CIFAR-10"
    found = attention + random
    machines = ", ".join(sorted({short_machine(src.json(x.rel), x.rel) for x in found}))
    seeds = f"{len(attention)} seeds each" if len(attention) == len(random) else f"{len(attention)} and {len(random)} seeds"
    budget = f"{found[0].epochs} epochs from scratch, {seeds}"
    return [f"{where}: attention tickets (all blocks) vs random drop, drop {drop:g}", figure, machines, budget]


def photo_headline(src: Source, rel: str, drop: float = 0.5) -> list[str] | None:
    data = src.json(rel)
    rows = {(r["selection"], r["drop"]): r for r in data["rows"]}
    attention, random, full = rows.get(("all", drop)), rows.get(("random", drop)), rows.get(("full", 0.0))
    if not attention or "vs_random" not in attention:
        return None
    diff = attention["vs_random"]
    figure = (
        f"{attention['test_mean']:.2f}% vs {random['test_mean']:.2f}% ({signed(diff['mean'])} ± {num(diff['standard_error'] or 0)})"
        + (f"; full data {full['test_mean']:.2f}%" if full else "")
    )
    how = f"pruned to {data['sparsity']:g}, fine-tuned" if data["mode"] == "finetune" else "from scratch"
    budget = (
        f"scorer trained {data['baseline_epochs']} epochs; {data['recipe']['epochs']} epoch(s) {how},"
        f" {len(attention['seeds'])} seeds each"
    )
    what = f"Tiny-ImageNet-100: attention tickets (all blocks) vs random drop, drop {drop:g}"
    return [what, figure, short_machine(data, rel), budget]


def step_headline(src: Source) -> list[str] | None:
    if not src.has("token_gather_step.json"):
        return None
    data = src.json("token_gather_step.json")
    half = next(row for row in data["rows"] if row["keep_ratio"] == 0.5)
    figure = f"{half['fraction_of_dense']:.3f}x the time of a full step"
    return ["a training step on half the patches", figure, short_machine(data, ""), f"ViT-Tiny, batch {data['batch_size']}"]


def compress_headline(src: Source) -> list[str] | None:
    if not src.has(HEADLINE_COMPRESS):
        return None
    data = src.json(HEADLINE_COMPRESS)
    m = data["metrics"]
    what = f"ISSP to {m['sparsity']:.0%} sparsity (one-shot {m['stage1_sparsity']:.0%}, then ISP)"
    figure = f"{pct(m['compressed_accuracy'])} vs dense {pct(m['dense_accuracy'])}"
    budget = f"fine-tuned {data['recipe']['finetune']['epochs']} epochs on tickets at drop {m['drop']:g} (dense: not fine-tuned)"
    return [what, figure, short_machine(data, HEADLINE_COMPRESS), budget]


def export_headline(src: Source, rel: str = "frontier_cifar10.json") -> list[str] | None:
    """The exported graph of a model fine-tuned drop-aware, at drop 0.5 against drop 0."""
    if not src.has(rel):
        return None
    data = src.json(rel)
    points = {(p["model"], p["drop"]): p for p in data["points"]}
    half, whole = points.get(("aware", 0.5)), points.get(("aware", 0.0))
    if not half or not whole:
        return None
    ratio = half["latency_ms"]["64"] / whole["latency_ms"]["64"]
    figure = f"{ratio:.3f}x the latency of drop 0; {pct(half['test_accuracy'])} vs {pct(whole['test_accuracy'])}"
    budget = f"fine-tuned drop-aware {data['finetune_epochs']} epoch(s); all 10,000 CIFAR-10 test images"
    return ["exported graph at drop 0.5 (ONNX Runtime, batch 64)", figure, short_machine(data, rel), budget]


def serve_headline(src: Source) -> list[str] | None:
    if not src.has(HEADLINE_SERVE):
        return None
    data = src.json(HEADLINE_SERVE)
    checks = data["checks"]
    figure = (
        f"p50 at drop 0.5: {checks['p50_drop_0.5_over_drop_0']['16']:.2f}x that at drop 0;"
        f" batching: {checks['throughput_gain_batching_concurrency_16']['0.0']:.2f}x the throughput of none"
    )
    budget = f"{data['batching']['config']['requests']} requests a cell"
    return ["`lotus serve`, concurrency 16", figure, short_machine(data, ""), budget]


def frontier_dense(data: dict) -> dict:
    """A frontier's dense model served whole: the point every other is compared with."""
    return next(p for p in data["points"] if p["model"] == "dense" and p["drop"] == 0.0)


def frontier_budget(data: dict) -> str:
    return f"every model fine-tuned {data['finetune_epochs']} epoch(s) from one baseline; chosen on validation"


def frontier_headline(src: Source, rel: str, targets: tuple[float, ...] = (0.65, 0.5)) -> list[str] | None:
    """The best LOTUS and ToMe points at each target latency: a README row per frontier."""
    data = src.json(rel)
    picks = [m for m in data["matched_latency"] if m["target"] in targets and m["lotus"] and "tome_any" in m]
    if not picks:
        return None
    dense = frontier_dense(data)

    def point(p: dict | None) -> str:
        return "ToMe none under it" if p is None else f"{pct(p['test_accuracy'])} ({p['model']}, {frontier_setting(p)})"

    figure = "; ".join(f"{m['target']:g}x: {point(m['lotus'])} vs {point(m['tome_any'])}" for m in picks)
    figure += f"; dense {pct(dense['test_accuracy'])}"
    budget = frontier_budget(data)
    at = " and ".join(f"{m['target']:g}x" for m in picks)
    what = f"{dataset_name(data['data'])}: best LOTUS vs best ToMe point at {at} dense latency (ONNX Runtime, batch 64)"
    return [what, figure, short_machine(data, rel), budget]


def stacked_headline(src: Source, rel: str, target: float = 0.25) -> list[str] | None:
    """The stacked model's best point (chosen on validation) at or under `target` of dense fp32
    latency, beside dense: how much accuracy the cheapest way LOTUS serves costs."""
    data = src.json(rel)
    under = [p for p in data["points"] if p["family"].startswith("stacked") and p["fraction_of_dense"]["64"] <= target]
    if not under:
        return None
    best = max(under, key=lambda p: p["val_accuracy"])
    dense = frontier_dense(data)
    taught = ", distilled from the fine-tuned dense model" if best["family"].endswith("distilled-dense") else ""
    figure = (
        f"{pct(best['test_accuracy'])} ({frontier_setting(best)}{taught}) at {num(best['fraction_of_dense']['64'], 3)}x;"
        f" dense {pct(dense['test_accuracy'])} ({best['test_accuracy'] - dense['test_accuracy']:+.2f})"
    )
    what = (
        f"{dataset_name(data['data'])}: LOTUS stacked (structured + drop-aware + int8) at <= {target:g}x dense fp32"
        " latency (ONNX Runtime, batch 64)"
    )
    budget = frontier_budget(data)
    return [what, figure, short_machine(data, rel), budget]


def longest_frontiers(src: Source) -> list[str]:
    """Per dataset, the frontier whose models were fine-tuned longest: README shows that one."""
    longest: dict[str, tuple[int, str]] = {}
    for rel in src.glob("frontier_*.json"):
        data = src.json(rel)
        epochs, name = data["finetune_epochs"], dataset_name(data["data"])
        if name not in longest or epochs > longest[name][0]:
            longest[name] = (epochs, rel)
    return [rel for _, rel in longest.values()]


def headline_rows(src: Source) -> list[list[str]]:
    """The few figures README shows: [result, figure, machine, budget]."""
    rows = (
        step_headline(src),
        ticket_headline(src, "cifar10_tickets", 0.5),
        ticket_headline(src, "cluttered64_tickets", 0.3),
        *(photo_headline(src, rel) for rel in photo_grids(src)),
        compress_headline(src),
        export_headline(src),
        serve_headline(src),
        *(row for rel in longest_frontiers(src) for row in (frontier_headline(src, rel), stacked_headline(src, rel))),
    )
    return [row for row in rows if row]


def readme_block(src: Source) -> str:
    rows = headline_rows(src)
    lines = [""]
    if rows:
        lines += table(["result", "figure", "machine", "budget"], rows)
    lines += [f"Every result with its machine, budget and source files: [docs/{PAGE}](docs/{PAGE}).", ""]
    return "\n".join(lines) + "\n"


def headline_data(src: Source) -> dict:
    """What the headline picture plots: training cost against accuracy, and the exported graph's latency against accuracy."""
    data: dict = {}
    runs = [r for r in load_runs(src, "**/cifar10_tickets/epochs*/*.json") if r.gpu]
    if src.has("token_gather_step.json") and runs:
        step = {round(1 - row["keep_ratio"], 2): row["fraction_of_dense"] for row in src.json("token_gather_step.json")["rows"]}
        cells = by_cell(runs)
        series = {}
        for key in ("full", "attention-cls", "attention-cls-all", "random"):
            points = [
                (step[drop], *mean_sd([r.accuracy for r in found]), drop, len(found))
                for (k, drop), found in sorted(cells.items())
                if k == key and drop in step
            ]
            if points:
                series[key] = points
        data["train"] = series
    if src.has("frontier_cifar10.json"):
        points = src.json("frontier_cifar10.json")["points"]
        series = {
            name: [
                (p["fraction_of_dense"]["64"], p["test_accuracy"], frontier_setting(p))
                for p in points
                if p["family"] == family and (family != "dense" or p["drop"] == 0)
            ]
            for family, name in HEADLINE_FRONTIER.items()
        }
        data["export"] = {name: found for name, found in series.items() if found}
    return data


# frontier families the headline picture shows -> their names there
HEADLINE_FRONTIER = {
    "dense": "dense, fp32",  # its drop-0 point only: the reference
    "aware": "LOTUS drop-aware, fp32",
    "aware-int8": "LOTUS drop-aware, int8",
    "stacked": "LOTUS stacked (structured + drop-aware + int8)",
    "tome-int8": "ToMe, int8",
}


def draw_headline(data: dict, path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from lotus.plots import pyplot

    plt = pyplot()
    panels = [name for name in ("train", "export") if data.get(name)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        (draw_training if name == "train" else draw_export)(ax, data[name])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_training(ax, series: dict) -> None:
    names = {
        "full": "full data",
        "attention-cls": "attention tickets, last block",
        "attention-cls-all": "attention tickets, all blocks",
        "random": "random drop",
    }
    drops = sorted({(p[0], p[3]) for points in series.values() for p in points if p[3]})
    for x, drop in drops:
        ax.axvline(x, color="0.85", linewidth=0.8, zorder=0)
        ax.annotate(
            f"drop {drop:g}", (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points", fontsize=7
        )
    for i, (key, points) in enumerate(series.items()):
        x, mean, sd, _, counts = zip(*points)
        low, high = min(counts), max(counts)
        seeds = "one seed" if high == 1 else f"{high} seeds" if low == high else f"{low} to {high} seeds"
        name = f"{names.get(key, key)} ({seeds})"
        if key == "full":
            ax.axhline(mean[0], color="0.4", linestyle="--", linewidth=1)
            ax.plot(x, mean, marker="*", markersize=12, color="0.3", linestyle="none", label=name)
            continue
        dodge = (i - len(series) / 2) * 0.004  # keeps the error bars of one drop ratio apart
        ax.errorbar([v + dodge for v in x], mean, yerr=sd, marker="o", capsize=3, label=name)
    ax.set_xlabel("training step time, fraction of a full-image step (2 CPU cores)")
    ax.set_ylabel("CIFAR-10 test accuracy after 5 epochs (%)")
    ax.set_title("Training on fewer patches (ViT-Tiny from scratch; mean ± sd over seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def draw_export(ax, series: dict) -> None:
    for name, points in series.items():
        x, y, _ = zip(*sorted(points))
        if name == HEADLINE_FRONTIER["dense"]:
            ax.plot(x, y, marker="*", markersize=12, color="0.3", linestyle="none", label=name)
            continue
        ax.plot(x, y, marker="o", linewidth=2.5 if name == HEADLINE_FRONTIER["aware"] else 1, label=name)
    ax.set_xlabel("ONNX Runtime latency at batch 64, fraction of dense fp32 (2 CPU cores)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title("Serving with fewer patches, ToMe beside (equal fine-tuning)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


# ---------------------------------------------------------------- render, write, check


@dataclass
class Rendered:
    page: str  # docs/results.md
    images: dict[str, str]  # docs-relative copy -> results-relative source
    readme_block: str  # what goes between README's markers
    headline: dict  # the headline picture's data; empty when there is none to draw


INTRO = (
    "Every figure on this page is read or computed (means, standard deviations, differences, ratios) by"
    " `scripts/render_results.py` from the JSON files the benchmarks in `benchmarks/` wrote under"
    " `benchmarks/results/`; `make results` rewrites the page and a test fails when it is out of date."
    " Each table names its machine, its budget and its source files. The CPU machine has 2 cores shared"
    " with other jobs: ratios are measured side by side within one run, and absolute times say under what"
    " load they were taken. GPU runs often shared the GPU with other runs, so their epoch times are not"
    ' compared with one another. "mean ± sd (n seeds)" is a mean over training seeds with the sample'
    " standard deviation."
)
CAPTION = (
    "Left: a ViT-Tiny trained 5 epochs from scratch on CIFAR-10, on whole images or on a fraction of each"
    " image's patches (attention tickets or random), against the time of a training step on that many patches"
    " (mean ± sd over seeds; accuracies from the GPUs, step times from the CPU). Right: the compressed model"
    " exported to ONNX, accuracy on the test set against latency as the drop ratio rises, one line per block"
    " that chooses the patches."
)


def render(src: Source) -> Rendered:
    page = Page()
    page.add(
        "# Results",
        "",
        f"<!-- Generated by scripts/render_results.py from benchmarks/results/: run `{FIX}`, do not edit. -->",
        "",
        INTRO,
        "",
    )
    headline = headline_data(src)
    if headline:
        page.add(f"![Accuracy against training cost and against serving latency]({HEADLINE_PNG})", "", f"_{CAPTION}_", "")
    for section in SECTIONS:
        section(src, page)
    return Rendered("\n".join(page.lines).rstrip() + "\n", page.images, readme_block(src), headline)


def with_block(text: str, block: str) -> str | None:
    """README's text with `block` between the markers, or None when it has no markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[: start + len(START)] + "\n" + block + text[end:]


def shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def stale_files(out: Rendered, results: Path, docs: Path, readme: Path) -> list[str]:
    """The files that differ from what would be written (the headline PNG: only that it exists)."""
    stale = []
    page = docs / PAGE
    if not page.is_file() or page.read_text() != out.page:
        stale.append(shown(page))
    for dest, rel in sorted(out.images.items()):
        copy = docs / dest
        if not copy.is_file() or copy.read_bytes() != (results / rel).read_bytes():
            stale.append(shown(copy))
    if out.headline and not (docs / HEADLINE_PNG).is_file():
        stale.append(shown(docs / HEADLINE_PNG))
    if readme.is_file():
        text = readme.read_text()
        expected = with_block(text, out.readme_block)
        if expected is not None and expected != text:
            stale.append(shown(readme) + " (headline block)")
    return stale


def write(out: Rendered, results: Path, docs: Path, readme: Path) -> None:
    (docs / PAGE).parent.mkdir(parents=True, exist_ok=True)
    (docs / PAGE).write_text(out.page)
    images = docs / IMG_DIR
    images.mkdir(parents=True, exist_ok=True)
    wanted = {docs / dest for dest in out.images}
    for old in sorted(images.glob("*.png")):
        if old not in wanted:
            old.unlink()
    for dest, rel in sorted(out.images.items()):
        shutil.copyfile(results / rel, docs / dest)
    if out.headline:
        draw_headline(out.headline, docs / HEADLINE_PNG)
    text = readme.read_text() if readme.is_file() else ""
    updated = with_block(text, out.readme_block)
    if updated is None:
        print(f"note: {shown(readme)} has no {START} / {END} markers: its headline block was not written")
    elif updated != text:
        readme.write_text(updated)
    print(f"wrote {shown(docs / PAGE)} and {len(out.images)} images under {shown(images)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file differs from what would be written")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the benchmarks' results folder")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder to write results.md and img/ into")
    parser.add_argument("--readme", type=Path, default=README, help="the README whose headline block to fill")
    args = parser.parse_args(argv)
    out = render(Source(args.results))
    if not args.check:
        write(out, args.results, args.docs, args.readme)
        return 0
    stale = stale_files(out, args.results, args.docs, args.readme)
    if stale:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        print(f"{stale[0]}{more} is out of date with {shown(args.results)}: run `{FIX}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
