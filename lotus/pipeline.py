"""`lotus compress`: every LOTUS stage in order on one model and one dataset, resumable.

baseline (load or train, evaluate) -> data lottery tickets at `drop` -> stage 1 one-shot prune
at `sparsity` (or the sweep's knee for 'auto') -> stage 2 ISP (to `isp_target`, when given) ->
structured pruning (heads and MLP neurons removed, when `structure` asks) -> fine-tune the
pruned model on the lottery data -> evaluate -> report.

Everything lands in one run folder. `stages.json` records each finished stage with its
figures, so `resume=True` skips finished stages, and the training stages (baseline, fine-tune)
continue from their last finished epoch. The recipe (`recipe.yaml`) holds every setting, so
`lotus compress --recipe RUN/recipe.yaml` repeats the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from lotus.checkpoint import atomic_write_text, load_model, save_model
from lotus.data import DataConfig
from lotus.errors import LotusError
from lotus.masks import nm_pattern, prunable_names, sparsity_report
from lotus.prune import ISPConfig, PruneConfig, SweepConfig, isp, prune_oneshot, prune_structured, sweep
from lotus.structured import StructuredConfig
from lotus.tickets import TicketConfig, tickets_from_checkpoint
from lotus.train import TrainConfig, batch_tokens, default_configs, evaluate_checkpoint, train
from lotus.vit import ModelConfig

STAGES = ("baseline", "tickets", "prune", "isp", "structure", "finetune", "evaluate", "report")
STATE_FILE = "stages.json"


@dataclass(frozen=True)
class CompressConfig:
    data: DataConfig = DataConfig("digits", img_size=16)  # the dataset (see lotus.data)
    checkpoint: str | None = None  # dense model to compress; None = train the baseline first
    model: ModelConfig = ModelConfig(depth=4, drop_path_rate=0.0)  # the baseline to train when no checkpoint
    baseline: TrainConfig = TrainConfig(epochs=20, batch_size=32, lr=5e-4, warmup_epochs=1.0)  # its training
    tickets: TicketConfig = TicketConfig(drop=0.1)  # data lottery tickets
    sparsity: float | str = 0.3  # stage-1 one-shot sparsity of the prunable weights, 'auto' (the knee), or '2:4'
    sweep: SweepConfig = SweepConfig()  # the sweep behind 'auto' (its tolerance sets the knee)
    prune: PruneConfig = PruneConfig()  # what is pruned and how it is ranked
    isp_target: float | None = None  # stage-2 ISP target sparsity; None skips stage 2
    isp: ISPConfig = ISPConfig()  # stage-2 settings (its target is isp_target)
    structure: StructuredConfig = StructuredConfig()  # heads / MLP neurons to remove (none by default)
    finetune: TrainConfig = TrainConfig(epochs=5, batch_size=32, lr=2.5e-4, warmup_epochs=0.5)  # fine-tuning on lottery data
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N'


def default_compress_config(data_name: str) -> CompressConfig:
    """Settings for a dataset: its baseline recipe, and fine-tuning at half its learning rate."""
    data_cfg, model_cfg, train_cfg = default_configs(data_name)
    finetune = replace(train_cfg, epochs=5, lr=train_cfg.lr / 2, warmup_epochs=0.5)
    return CompressConfig(data=data_cfg, model=model_cfg, baseline=train_cfg, finetune=finetune)


def to_dict(cfg: Any) -> Any:
    return asdict(cfg) if is_dataclass(cfg) else cfg


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from a dict; unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise LotusError(f"unknown {cls.__name__} settings in the recipe: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name) if name in known else None
        if is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def save_recipe(cfg: CompressConfig, path: Path) -> None:
    atomic_write_text(
        path, "# lotus compress --recipe THIS_FILE repeats the run\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    )


def load_recipe(path: str | Path) -> CompressConfig:
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LotusError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(values, dict):
        raise LotusError(f"recipe {path} is not a mapping of settings: write it with `lotus compress` first")
    return from_dict(CompressConfig, values)


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
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
        return record


def compress(
    cfg: CompressConfig, run_dir: str | Path, *, resume: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the whole pipeline into `run_dir`; returns metrics.json's contents."""
    run = Path(run_dir)
    state_path = run / STATE_FILE
    if state_path.exists() and not resume:
        raise LotusError(f"{run} already holds a compress run: pass --resume to continue it, or a new --out")
    run.mkdir(parents=True, exist_ok=True)
    if resume and (run / "recipe.yaml").exists() and load_recipe(run / "recipe.yaml") != cfg:
        raise LotusError(f"{run} was started with other settings: resume with `--recipe {run / 'recipe.yaml'} --resume`")
    save_recipe(cfg, run / "recipe.yaml")
    state = RunState.open(state_path)
    cfg.structure.check()
    if nm_pattern(cfg.sparsity) and (cfg.isp_target is not None or cfg.structure.enabled):
        raise LotusError(
            f"--sparsity {cfg.sparsity} keeps an N:M pattern that ISP and structured pruning would break: "
            "drop --isp-target and --structure, or use a plain sparsity"
        )
    todo = [
        s for s in STAGES if not (s == "isp" and cfg.isp_target is None) and not (s == "structure" and not cfg.structure.enabled)
    ]

    def stage(name: str) -> bool:
        """Announce a stage; False when an earlier run already finished it."""
        number = f"[{todo.index(name) + 1}/{len(todo)}]"
        if name in state.done:
            log(f"{number} {name}: done earlier, skipped")
            return False
        log(f"{number} {name}")
        return True

    # 1. baseline: load or train, then evaluate
    baseline_ckpt = Path(cfg.checkpoint) if cfg.checkpoint else run / "baseline"
    if stage("baseline"):
        start = time.perf_counter()
        history = []
        if cfg.checkpoint is None:
            log("  no --checkpoint: training the dense baseline first")
            history = train(cfg.data, cfg.model, replace(cfg.baseline, device=cfg.device), run / "baseline", resume=True)
        result = evaluate_checkpoint(baseline_ckpt, cfg.data, device=cfg.device)
        state.finish(
            "baseline", _stage_record(result["accuracy"], time.perf_counter() - start, history, checkpoint=str(baseline_ckpt))
        )

    # 2. data lottery tickets
    if stage("tickets"):
        start = time.perf_counter()
        tickets = tickets_from_checkpoint(baseline_ckpt, cfg.data, cfg.tickets, run / "tickets", device=cfg.device)
        seconds = time.perf_counter() - start
        state.finish(
            "tickets",
            {
                "seconds": seconds,
                "images_per_second": tickets.meta["data"]["num_images"] / seconds,
                "num_keep": tickets.num_keep,
                "num_patches": tickets.meta["num_patches"],
                "outlier_patches": tickets.meta["outlier_patches"],
                "accuracy": None,
            },
        )

    # 3. stage 1: one-shot magnitude pruning at the given or essential sparsity
    if stage("prune"):
        start = time.perf_counter()
        essential = None
        level = cfg.sparsity
        if level == "auto":
            swept = sweep(baseline_ckpt, cfg.data, replace(cfg.sweep, prune=cfg.prune), run / "sweep", device=cfg.device)
            essential = level = swept["essential_sparsity"]
            log(f"  essential sparsity {essential:g} (dense {swept['dense_accuracy']:.2f}%)")
        level = level if nm_pattern(level) else float(level)
        result = prune_oneshot(baseline_ckpt, level, run / "stage1", cfg.prune, data_cfg=cfg.data, device=cfg.device)
        state.finish(
            "prune",
            {
                "accuracy": result["accuracy"],
                "seconds": time.perf_counter() - start,
                "images_per_second": None,
                "requested_sparsity": level,
                "sparsity": result["sparsity"]["overall"],
                "essential_sparsity": essential,
            },
        )
    pruned_ckpt = run / "stage1"

    # 4. stage 2: Instant Soup Pruning
    if cfg.isp_target is not None:
        if stage("isp"):
            start = time.perf_counter()
            result = isp(
                pruned_ckpt,
                cfg.data,
                replace(cfg.isp, target=cfg.isp_target, prune=cfg.prune),
                run / "stage2",
                device=cfg.device,
                log=lambda line: log("  " + line),
            )
            state.finish(
                "isp",
                {
                    "accuracy": result["rounds"][-1]["accuracy"],
                    "seconds": time.perf_counter() - start,
                    "images_per_second": None,
                    "sparsity": result["achieved_sparsity"],
                    "rounds": result["rounds"],
                },
            )
        pruned_ckpt = run / "stage2"

    # 5. structured pruning: whole heads and MLP neurons removed, the model shrunk
    if cfg.structure.enabled:
        if stage("structure"):
            start = time.perf_counter()
            result = prune_structured(pruned_ckpt, run / "structured", cfg.structure, data_cfg=cfg.data, device=cfg.device)
            log(
                f"  heads per block {result['structure']['num_heads']}, MLP widths {result['structure']['mlp_hidden']}, "
                f"parameters x{result['parameters']['ratio']:.3f}"
            )
            state.finish(
                "structure",
                {
                    "accuracy": result["accuracy"],
                    "seconds": time.perf_counter() - start,
                    "images_per_second": None,
                    "structure": result["structure"],
                    "parameters": result["parameters"],
                },
            )
        pruned_ckpt = run / "structured"

    # 6. fine-tune the pruned model on the lottery data (resumes from its last finished epoch)
    if stage("finetune"):
        start = time.perf_counter()
        history = train(
            cfg.data,
            cfg.model,
            replace(cfg.finetune, device=cfg.device),
            run / "finetune",
            init_checkpoint=pruned_ckpt,
            tickets=run / "tickets",
            resume=True,
        )
        seconds = time.perf_counter() - start
        ratio = measure_step_ratio(run, cfg)
        log(f"  a dense training step takes {ratio:.2f}x a lottery step (measured side by side)")
        state.finish("finetune", _stage_record(history[-1]["test_accuracy"], seconds, history, dense_step_ratio=ratio))

    # 7. evaluate the compressed model; it becomes the run's model (RUN/model.safetensors)
    if stage("evaluate"):
        start = time.perf_counter()
        model, meta = load_model(run / "finetune")
        report = sparsity_report(model, prunable_names(model, cfg.prune.include))
        save_model(
            run,
            model,
            ModelConfig(**meta["model"]),
            meta["preprocess"],
            meta["masks"],
            tickets=meta.get("tickets"),
            sparsity={k: report[k] for k in ("overall", "zeros", "numel")},
            stage="compressed",
        )
        result = evaluate_checkpoint(run, cfg.data, device=cfg.device)
        state.finish(
            "evaluate",
            {
                "accuracy": result["accuracy"],
                "seconds": time.perf_counter() - start,
                "images_per_second": result["images_per_second"],
                "sparsity": report["overall"],
                "layers": {k: v["sparsity"] for k, v in report["layers"].items()},
            },
        )

    # 8. report
    from lotus.report import write_report

    stage("report") if "report" not in state.done else None
    metrics = write_report(run, cfg, state.done)
    state.finish("report", {"seconds": 0.0, "accuracy": None, "images_per_second": None})
    return metrics


def _stage_record(accuracy: float, seconds: float, history: list[dict], **extra: Any) -> dict[str, Any]:
    """A training stage's figures: accuracy, wall time, and training images/s over its epochs."""
    train_seconds = sum(h["epoch_seconds"] for h in history)
    images = sum(h["epoch_seconds"] * h["images_per_second"] for h in history)
    return {
        "accuracy": accuracy,
        "seconds": seconds,
        "images_per_second": images / train_seconds if history else None,
        "train_seconds": train_seconds if history else None,
        "history": history,
        **extra,
    }


def measure_step_ratio(run: Path, cfg: CompressConfig, steps: int = 16) -> float:
    """Dense training-step time over lottery training-step time, measured side by side on the
    device the fine-tuning ran on."""
    import torch.nn.functional as F

    from lotus.data import BatchLoader, default_augment, load_split_for_model
    from lotus.device import autocast, resolve_device
    from lotus.tickets import load_tickets

    device = resolve_device(cfg.device)
    model, meta = load_model(run / "finetune", device)
    tickets = load_tickets(run / "tickets")
    data = load_split_for_model(cfg.data, meta["preprocess"], "train")
    pre = meta["preprocess"]
    loader = BatchLoader(data, cfg.finetune.batch_size, pre["mean"], pre["std"], shuffle=True, augment=default_augment(data.name))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: time the work, change nothing that matters
    model.train()
    times = {"dense": [], "lottery": []}
    for i, batch in zip(range(2 * steps + 2), loader.epoch(0)):
        mode = "dense" if i % 2 == 0 else "lottery"
        keep, fuse = batch_tokens(tickets.tokens_for_batch if mode == "lottery" else None, batch, device)
        images, labels = batch.images.to(device), batch.labels.to(device)
        _sync(device)
        start = time.perf_counter()
        with autocast(device):
            logits = model(images, keep, fuse)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 2:  # the first pair warms up
            times[mode].append(time.perf_counter() - start)
    return sorted(times["dense"])[len(times["dense"]) // 2] / sorted(times["lottery"])[len(times["lottery"]) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
