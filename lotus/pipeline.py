"""`lotus compress`: every LOTUS stage in order on one model and one dataset, resumable.

baseline (load or train, evaluate) -> data lottery tickets at `drop` -> stage 1 one-shot prune
at `sparsity` (or the sweep's knee for 'auto') -> stage 2 ISP (to `isp_target`, when given) ->
structured pruning (heads and MLP neurons removed, when `structure` asks) -> fine-tune the
pruned model on the lottery data -> evaluate -> report.

Choices read the validation split, reports the test split: the sweep behind 'auto' picks its
knee on the validation images (held out of the training split, never trained on), and ISP
evaluates its rounds on them; each stage then reports its model's accuracy on the test split
(`accuracy`) and, beside it, on the validation split (`val_accuracy`). Nothing is chosen by a test
figure, and training keeps its last epoch (no best-epoch choice).

Everything lands in one run folder. `stages.json` records each finished stage with its
figures, so `resume=True` skips finished stages, and the training stages (baseline, fine-tune)
continue from their last finished epoch. The recipe (`recipe.yaml`) holds every setting, so
`lotus compress --recipe RUN/recipe.yaml` repeats the run.

The stages are a table (`STAGES`) that `compress` walks: each stage is a function from the run
to its figures, and the runner alone announces it ("[2/7] tickets"), skips it when an earlier
run finished it, times it and records it in stages.json.

The settings (`CompressConfig`) live in `lotus.config`, and the recipe and the check before any
stage (`check_settings`) in `lotus.settings`, all without torch, so the CLI refuses a bad setting
before it loads this module; they are importable from here too.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lotus.checkpoint import atomic_write_json, labels_of, load_model, save_model
from lotus.config import BASELINE_TEACHER, CompressConfig, ModelConfig, holdout, nm_pattern
from lotus.config import default_compress_config as default_compress_config  # re-exported with the recipe functions
from lotus.errors import LotusError
from lotus.masks import prunable_names, sparsity_report, sparsity_summary
from lotus.progress import Progress
from lotus.prune import isp, prune_oneshot, prune_structured, sweep
from lotus.report import build_metrics, write_report
from lotus.settings import check_settings, load_recipe, save_recipe
from lotus.settings import from_dict as from_dict
from lotus.settings import to_dict as to_dict
from lotus.tickets import tickets_from_checkpoint
from lotus.train import batch_tokens, dropping, evaluate_checkpoint, teaching, train

STATE_FILE = "stages.json"


@dataclass
class RunState:
    """What stages.json holds: the finished stages and their figures."""

    path: Path
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> RunState:
        if path.exists():
            return cls(path, json.loads(path.read_text()))
        return cls(path)

    def finish(self, stage: str, record: dict[str, Any]) -> dict[str, Any]:
        self.done[stage] = record
        atomic_write_json(self.path, self.done)
        return record


@dataclass
class Run:
    """What every stage gets: the settings, the run folder, the finished stages, where to speak."""

    cfg: CompressConfig
    dir: Path
    state: RunState
    log: Callable[[str], None]
    progress: Progress | None
    started: float = 0.0  # time.perf_counter() when the current stage started

    def seconds(self) -> float:
        """Seconds since the current stage started."""
        return time.perf_counter() - self.started

    @property
    def baseline(self) -> Path:
        """The dense checkpoint: the one given, or the baseline trained here."""
        return Path(self.cfg.checkpoint) if self.cfg.checkpoint else self.dir / "baseline"

    @property
    def teacher(self) -> str | None:
        """Fine-tuning's distillation teacher: the baseline where the recipe says BASELINE_TEACHER."""
        distill = self.cfg.finetune.distill
        return str(self.baseline) if distill == BASELINE_TEACHER else distill

    @property
    def unstructured(self) -> Path:
        """The checkpoint of the last unstructured pruning stage: ISP's when it runs, else stage 1's."""
        return self.dir / ("stage2" if self.cfg.isp_target is not None else "stage1")

    @property
    def pruned(self) -> Path:
        """The last pruning stage's checkpoint, which fine-tuning starts from."""
        return self.dir / "structured" if self.cfg.structure.enabled else self.unstructured


# Each stage does its work and returns its figures for stages.json. The runner adds what every
# stage has (accuracy on the test split, val_accuracy on the validation split, seconds, images/s:
# None where a stage has none; seconds by the runner's clock unless the stage gives its own).


def _validation(run: Run, checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint evaluated on the validation split (None when the run has none)."""
    if holdout(run.cfg.data)["source"] is None:
        return None
    return evaluate_checkpoint(checkpoint, run.cfg.data, device=run.cfg.device, split="val")


def _val_accuracy(run: Run, checkpoint: Path) -> float | None:
    """A checkpoint's validation accuracy (None when the run has no validation split)."""
    result = _validation(run, checkpoint)
    return None if result is None else result["accuracy"]


def _baseline(run: Run) -> dict[str, Any]:
    """Load or train the dense model, then evaluate it on the test and the validation split."""
    cfg, history = run.cfg, []
    if cfg.checkpoint is None:
        run.log("  no --checkpoint: training the dense baseline first")
        train_cfg = replace(cfg.baseline, device=cfg.device)
        history = train(cfg.data, cfg.model, train_cfg, run.dir / "baseline", resume=True, progress=run.progress)
    result = evaluate_checkpoint(run.baseline, cfg.data, device=cfg.device)
    val = _validation(run, run.baseline) or {"accuracy": None, "images": None}
    return {
        "accuracy": result["accuracy"],
        "val_accuracy": val["accuracy"],
        "test_images": result["images"],
        "val_images": val["images"],
        **_training_figures(history),
        "checkpoint": str(run.baseline),
    }


def _tickets(run: Run) -> dict[str, Any]:
    """Score the training images' patches with the baseline and keep the best per image."""
    cfg = run.cfg
    tickets = tickets_from_checkpoint(
        run.baseline, cfg.data, cfg.tickets, run.dir / "tickets", device=cfg.device, progress=run.progress
    )
    seconds = run.seconds()
    return {
        "seconds": seconds,
        "images_per_second": tickets.meta["data"]["num_images"] / seconds,
        "num_keep": tickets.num_keep,
        "num_patches": tickets.meta["num_patches"],
        "outlier_patches": tickets.meta["outlier_patches"],
        **({"object_coverage": tickets.meta["object_coverage"]} if "object_coverage" in tickets.meta else {}),
    }


def _prune(run: Run) -> dict[str, Any]:
    """Stage 1: one-shot magnitude pruning at the given sparsity, or at the sweep's knee for 'auto'."""
    cfg, essential, level = run.cfg, None, run.cfg.sparsity
    if level == "auto":
        sweep_cfg = replace(cfg.sweep, prune=cfg.prune)
        swept = sweep(run.baseline, cfg.data, sweep_cfg, run.dir / "sweep", device=cfg.device, progress=run.progress)
        essential = level = swept["essential_sparsity"]
        run.log(
            f"  essential sparsity {essential:g}, chosen on the validation split (dense {swept['dense_accuracy']:.2f}% there)"
        )
    level = level if nm_pattern(level) else float(level)
    result = prune_oneshot(run.baseline, level, run.dir / "stage1", cfg.prune, data_cfg=cfg.data, device=cfg.device)
    return {
        "accuracy": result["accuracy"],
        "val_accuracy": _val_accuracy(run, run.dir / "stage1"),
        "requested_sparsity": level,
        "sparsity": result["sparsity"]["overall"],
        "essential_sparsity": essential,
    }


def _isp(run: Run) -> dict[str, Any]:
    """Stage 2: Instant Soup Pruning from stage 1 to `isp_target` (its rounds evaluated on the
    validation split), then the result reported on the test split."""
    cfg = run.cfg
    isp_cfg = replace(cfg.isp, target=cfg.isp_target, prune=cfg.prune)
    result = isp(
        run.dir / "stage1", cfg.data, isp_cfg, run.dir / "stage2", device=cfg.device, log=lambda line: run.log("  " + line)
    )
    return {
        "accuracy": evaluate_checkpoint(run.dir / "stage2", cfg.data, device=cfg.device)["accuracy"],
        "val_accuracy": result["rounds"][-1]["accuracy"],
        "sparsity": result["achieved_sparsity"],
        "rounds": result["rounds"],
    }


def _structure(run: Run) -> dict[str, Any]:
    """Remove whole heads and MLP neurons: the model shrinks."""
    cfg = run.cfg
    result = prune_structured(run.unstructured, run.dir / "structured", cfg.structure, data_cfg=cfg.data, device=cfg.device)
    run.log(
        f"  heads per block {result['structure']['num_heads']}, MLP widths {result['structure']['mlp_hidden']}, "
        f"parameters x{result['parameters']['ratio']:.3f}"
    )
    return {
        "accuracy": result["accuracy"],
        "val_accuracy": _val_accuracy(run, run.dir / "structured"),
        "structure": result["structure"],
        "parameters": result["parameters"],
    }


def _finetune(run: Run) -> dict[str, Any]:
    """Fine-tune the pruned model on the lottery data (resuming from its last finished epoch), then
    time a dense and a lottery training step side by side."""
    cfg = run.cfg
    history = train(
        cfg.data,
        cfg.model,
        replace(cfg.finetune, device=cfg.device, distill=run.teacher),
        run.dir / "finetune",
        init_checkpoint=run.pruned,
        tickets=None if cfg.finetune.drop_aware else run.dir / "tickets",  # drop-aware: the graph's own patches
        resume=True,
        progress=run.progress,
    )
    seconds = run.seconds()  # the fine-tuning's, without the timing below
    ratio = measure_step_ratio(run.dir, cfg, run.teacher)
    taught = ", its teacher's forward pass included" if run.teacher else ""
    run.log(f"  a dense training step takes {ratio:.2f}x a lottery step{taught} (measured side by side)")
    figures = _training_figures(history)
    return {
        "accuracy": history[-1]["test_accuracy"],
        "val_accuracy": _val_accuracy(run, run.dir / "finetune"),
        "seconds": seconds,
        **figures,
        "dense_step_ratio": ratio,
    }


def _evaluate(run: Run) -> dict[str, Any]:
    """Save the fine-tuned model as the run's model (RUN/model.safetensors) and evaluate it."""
    cfg = run.cfg
    model, meta = load_model(run.dir / "finetune")
    report = sparsity_report(model, prunable_names(model, cfg.prune.include))
    save_model(
        run.dir,
        model,
        ModelConfig(**meta["model"]),
        meta["preprocess"],
        meta["masks"],
        tickets=meta.get("tickets"),
        sparsity=sparsity_summary(report),
        holdout=meta.get("holdout"),
        pretrained=meta.get("pretrained"),
        stage="compressed",
    )
    result = evaluate_checkpoint(run.dir, cfg.data, device=cfg.device)
    return {
        "accuracy": result["accuracy"],
        "val_accuracy": _val_accuracy(run, run.dir),
        "images_per_second": result["images_per_second"],
        "sparsity": report["overall"],
        "layers": {k: v["sparsity"] for k, v in report["layers"].items()},
        "labels": labels_of(meta["preprocess"]),
    }


def _report(run: Run) -> dict[str, Any]:
    """metrics.json, history.csv, the plots and report.md, from the other stages' records."""
    write_report(run.dir, run.cfg, run.state.done)
    return {}


@dataclass(frozen=True)
class Stage:
    """One step of `compress`."""

    name: str
    run: Callable[[Run], dict[str, Any]]  # does the stage's work; returns its figures
    when: Callable[[CompressConfig], bool] = lambda cfg: True  # whether a run with these settings has it


STAGES = (
    Stage("baseline", _baseline),
    Stage("tickets", _tickets),
    Stage("prune", _prune),
    Stage("isp", _isp, when=lambda cfg: cfg.isp_target is not None),
    Stage("structure", _structure, when=lambda cfg: cfg.structure.enabled),
    Stage("finetune", _finetune),
    Stage("evaluate", _evaluate),
    Stage("report", _report),
)


def compress(
    cfg: CompressConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline into `run_dir`; returns metrics.json's contents.

    Args:
        resume: continue the run in `run_dir`: finished stages are skipped, the training stages
            continue from their last finished epoch.
        log: receives the stage lines ("[2/7] tickets").
        progress: passed to the training stages, the ticket scoring and the sweep.
    """
    check_settings(cfg)
    state = _open(Path(run_dir), cfg, resume)
    run = Run(cfg, Path(run_dir), state, log, progress)
    stages = [stage for stage in STAGES if stage.when(cfg)]
    for number, stage in enumerate(stages, 1):
        heading = f"[{number}/{len(stages)}] {stage.name}"
        if stage.name in state.done:
            log(f"{heading}: done earlier, skipped")
            continue
        log(heading)
        run.started = time.perf_counter()
        figures = stage.run(run)
        record = {"accuracy": None, "val_accuracy": None, "seconds": run.seconds(), "images_per_second": None}
        state.finish(stage.name, {**record, **figures})
    return build_metrics(cfg, state.done)


def _open(run: Path, cfg: CompressConfig, resume: bool) -> RunState:
    """The run folder's stages.json, after writing its recipe; refuses to start over a run unasked,
    or to resume one with other settings."""
    state_path = run / STATE_FILE
    if state_path.exists() and not resume:
        raise LotusError(f"{run} already holds a compress run: pass --resume to continue it, or a new --out")
    run.mkdir(parents=True, exist_ok=True)
    if resume and (run / "recipe.yaml").exists() and load_recipe(run / "recipe.yaml") != cfg:
        raise LotusError(f"{run} was started with other settings: resume with `--recipe {run / 'recipe.yaml'} --resume`")
    save_recipe(cfg, run / "recipe.yaml")
    return RunState.open(state_path)


def _training_figures(history: list[dict]) -> dict[str, Any]:
    """A training stage's training images/s and seconds over its epochs (None when it trained nothing here)."""
    train_seconds = sum(h["epoch_seconds"] for h in history)
    images = sum(h["epoch_seconds"] * h["images_per_second"] for h in history)
    return {
        "images_per_second": images / train_seconds if history else None,
        "train_seconds": train_seconds if history else None,
        "history": history,
    }


def measure_step_ratio(run: Path, cfg: CompressConfig, teacher: str | None = None, steps: int = 16) -> float:
    """Dense training-step time over lottery training-step time, on the device the fine-tuning ran on;
    with a distillation `teacher`, the lottery step runs it on the whole images too, as fine-tuning did.

    The two kinds of step alternate on fresh batches (the first pair warms up), so any drift in
    the machine's speed hits both alike; only the step itself is timed, not the batch preparation
    (which is why `lotus.bench.time_calls`, timing whole calls, does not fit here).
    """
    import torch.nn.functional as F

    from lotus.data import load_split_for_model, make_loader, resolve_augment
    from lotus.device import autocast, resolve_device
    from lotus.tickets import load_tickets

    device = resolve_device(cfg.device)
    model, meta = load_model(run / "finetune", device)
    teach = teaching(load_model(teacher)[0] if teacher else None, cfg.finetune, device)
    tickets = None if cfg.finetune.drop_aware else load_tickets(run / "tickets")
    pre = meta["preprocess"]
    data = load_split_for_model(cfg.data, pre, "train")
    augment = resolve_augment(cfg.finetune.augment, data)
    loader = make_loader(data, cfg.finetune.batch_size, pre["mean"], pre["std"], augment=augment, shuffle=True, geometric=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: time the work, change nothing that matters
    model.train()
    times = {"dense": [], "lottery": []}
    batches = itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())  # small data: several epochs
    for i, batch in zip(range(2 * steps + 2), batches):
        mode = "dense" if i % 2 == 0 else "lottery"
        lottery = mode == "lottery" and tickets is not None
        keep, fuse = batch_tokens(tickets.tokens_for_batch if lottery else None, batch, device)
        images, labels = batch.images.to(device), batch.labels.to(device)
        _sync(device)
        start = time.perf_counter()
        with autocast(device):
            logits = model(images, keep, fuse, dropping(model, cfg.finetune, i // 2) if mode == "lottery" else None)
        if mode == "lottery":
            teach(images)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 2:  # the first pair warms up
            times[mode].append(time.perf_counter() - start)
    return statistics.median_high(times["dense"]) / statistics.median_high(times["lottery"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
