"""The report of a `lotus compress` run: metrics.json, history.csv, plots and report.md.

Every accuracy names its split. `accuracy`, `dense_accuracy` and `compressed_accuracy` are on the
test split, which only reports; `val_accuracy`, `dense_val_accuracy` and
`compressed_val_accuracy` are on the validation split, which every choice reads (metrics.json's
`splits` says the same for tools).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lotus.checkpoint import atomic_write_csv, atomic_write_json, atomic_write_text
from lotus.config import BASELINE_TEACHER, holdout
from lotus.masks import nm_pattern
from lotus.plots import save_finetune_figure, save_stage_figure

# The split of each figure in metrics.json: the choices read validation, the reports test.
SPLITS = {
    "dense_accuracy": "test",
    "compressed_accuracy": "test",
    "dense_val_accuracy": "validation",
    "compressed_val_accuracy": "validation",
    "essential_sparsity": "validation",  # the sweep's knee: chosen on it
    "stages.accuracy": "test",
    "stages.val_accuracy": "validation",
}


def build_metrics(cfg: Any, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """metrics.json: the figures tools read, from the finished stages."""
    figures = ("accuracy", "val_accuracy", "seconds", "images_per_second")
    stages = {name: {key: rec.get(key) for key in figures} for name, rec in done.items() if name != "report"}
    finetune = done.get("finetune", {})
    train_seconds = finetune.get("train_seconds") or 0.0
    ratio = finetune.get("dense_step_ratio")
    dense_seconds = train_seconds * ratio if ratio else None
    return {
        "dense_accuracy": done["baseline"]["accuracy"],
        "compressed_accuracy": done["evaluate"]["accuracy"],
        "dense_val_accuracy": done["baseline"].get("val_accuracy"),
        "compressed_val_accuracy": done["evaluate"].get("val_accuracy"),
        "splits": SPLITS,
        "validation": {**holdout(cfg.data), "images": done["baseline"].get("val_images")},
        "test_images": done["baseline"].get("test_images"),
        "sparsity": done["evaluate"]["sparsity"],
        "drop": cfg.tickets.drop,
        "patches_kept": done["tickets"]["num_keep"],
        "patches": done["tickets"]["num_patches"],
        "essential_sparsity": done["prune"].get("essential_sparsity"),
        "stage1_sparsity": done["prune"]["sparsity"],
        "isp_sparsity": done.get("isp", {}).get("sparsity"),
        "structure": done.get("structure", {}).get("structure"),
        "parameters_ratio": done.get("structure", {}).get("parameters", {}).get("ratio"),
        "finetune_train_seconds": train_seconds,
        "dense_finetune_seconds_estimate": dense_seconds,
        "finetune_seconds_saved": dense_seconds - train_seconds if dense_seconds else None,
        "stages": stages,
    }


def write_report(run: Path, cfg: Any, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write metrics.json, history.csv, accuracy_per_stage.png, finetune.png and report.md."""
    metrics = build_metrics(cfg, done)
    atomic_write_json(run / "metrics.json", metrics)

    rows = [{"stage": stage, **h} for stage in ("baseline", "finetune") for h in done.get(stage, {}).get("history", [])]
    if rows:
        atomic_write_csv(run / "history.csv", rows)
    save_stage_figure(run / "accuracy_per_stage.png", {k: v.get("accuracy") for k, v in done.items()})
    if done.get("finetune", {}).get("history"):
        save_finetune_figure(run / "finetune.png", done["finetune"]["history"], metrics["dense_accuracy"])
    atomic_write_text(run / "report.md", render_report(cfg, done, metrics))
    return metrics


def _scoring(tickets: Any) -> str:
    """Which attention scored the patches, in words."""
    layers = getattr(tickets, "layers", None)
    method = getattr(tickets, "method", "cls")
    if layers == "all" or (method != "cls" and not layers):
        blocks = "all blocks"
    else:  # None for cls: recorded before every block became the default, when it meant the last
        blocks = "blocks " + ", ".join(map(str, layers)) if layers else "the last block"
    how = {"rollout": "attention rollout over", "grad": "gradient-weighted attention rollout over"}
    return f"{how.get(method, 'the attention of')} {blocks}"


def _selection(tickets: Any) -> str:
    """How the kept patches were chosen, in words."""
    kind = f"by {_scoring(tickets)}" if tickets.select == "attention" else "at random"
    if tickets.select == "attention" and getattr(tickets, "spread", 1) > 1:
        kind += f", spread over {tickets.spread}x{tickets.spread} blocks of patches"
    if getattr(tickets, "balance", False):
        kind += ", ranked by patch position"
    temperature = getattr(tickets, "temperature", 0.0)
    fused = ", the dropped ones fused into one token" if getattr(tickets, "fuse", False) else ""
    if not temperature:
        return f"fixed per image, {kind}{fused}"
    return (
        "re-drawn every batch, "
        + (f"weight score^(1/T), T = {temperature:g}" if tickets.select == "attention" else "uniformly")
        + fused
    )


def _fmt(value: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render_report(cfg: Any, done: dict[str, dict[str, Any]], m: dict[str, Any]) -> str:
    """report.md: a short model card of the compressed model."""
    lines = [
        "# LOTUS compressed model",
        "",
        f"Data: `{cfg.data.name}`; baseline: {'`' + cfg.checkpoint + '`' if cfg.checkpoint else 'trained here'}; "
        f"recipe: `recipe.yaml` (`lotus compress --recipe recipe.yaml` repeats this run).",
        *_classes(done),
        "",
        *_summary_table(cfg, m),
        "",
        _splits_note(cfg, m),
        "",
        "## What kind of sparsity, and what speed it can bring",
        "",
        *_sparsity_kinds(cfg, m),
        "",
        "## Stages",
        "",
        *_stage_table(cfg, done),
        *_finetune_saving(done, m),
        *_layer_table(done),
        "",
        _files(done),
        "",
    ]
    return "\n".join(lines)


def _classes(done: dict[str, dict[str, Any]], shown: int = 10) -> list[str]:
    """The model's classes as people see them (the data's classes.tsv words, if it had one)."""
    labels = done["evaluate"].get("labels")
    if not labels:  # a run recorded before the labels were
        return []
    more = f", ... ({len(labels) - shown} more)" if len(labels) > shown else ""
    return ["", f"Classes ({len(labels)}): {', '.join(labels[:shown])}{more}."]


def _summary_table(cfg: Any, m: dict[str, Any]) -> list[str]:
    """Dense against compressed: accuracy, sparsity, patches per image, parameters."""
    lines = [
        "| | dense | compressed |",
        "|---|---|---|",
        f"| test accuracy | {m['dense_accuracy']:.2f}% | {m['compressed_accuracy']:.2f}% |",
        *(
            [f"| validation accuracy | {_pct(m['dense_val_accuracy'])} | {_pct(m['compressed_val_accuracy'])} |"]
            if m["validation"]["source"]
            else []
        ),
        f"| sparsity of the prunable weights (measured) | 0 | {m['sparsity']:.4f} |",
        f"| patches per training image | {m['patches']} | {_kept_in_finetuning(cfg, m)} |",
    ]
    if m.get("parameters_ratio"):
        lines.append(f"| parameters | 1 | x{m['parameters_ratio']:.3f} (heads and MLP neurons removed) |")
    return lines


def _kept_in_finetuning(cfg: Any, m: dict[str, Any]) -> str:
    """What fine-tuning trained on: the tickets' patches, or (drop-aware) those the exported graph keeps."""
    aware = cfg.finetune.drop_aware
    if aware:
        return f"drop-aware at {', '.join(f'{d:g}' for d in aware)}: the patches the exported graph keeps"
    return f"{m['patches_kept']} (drop {m['drop']:g}, {_selection(cfg.tickets)})"


def _teacher(finetune: Any) -> str:
    """The distillation teacher in words, with its loss weight and temperature."""
    who = "the dense baseline" if finetune.distill == BASELINE_TEACHER else finetune.distill
    return f"{who} (weight {finetune.distill_weight:g}, temperature {finetune.distill_temperature:g})"


def _splits_note(cfg: Any, m: dict[str, Any]) -> str:
    """Which split each figure comes from, and which split the run's choices read."""
    val = m["validation"]
    test = f"Test figures are on the test split ({_count(m.get('test_images'))}), read only to report them."
    if not val["source"]:
        return test + " This run has no validation split (`--val-fraction 0`), so it chose nothing by accuracy."
    where = (
        "the data set's own val/ folder"
        if val["source"] == "val/"
        else f"{100 * val['fraction']:g}% of each class held out of the training split with seed {val['seed']}, never trained on"
    )
    chose = (
        "the essential sparsity was chosen on it (the sweep)"
        if m.get("essential_sparsity") is not None
        else "this run chose nothing by accuracy (a fixed `--sparsity`)"
    )
    return f"{test} Validation figures are on the validation split ({_count(val.get('images'))}, {where}); {chose}."


def _count(images: int | None) -> str:
    return "images not counted" if images is None else f"{images:,} images"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _sparsity_kinds(cfg: Any, m: dict[str, Any]) -> list[str]:
    """The kinds of sparsity this run holds, and on what hardware each can bring speed."""
    if nm_pattern(cfg.sparsity):
        lines = [
            "- 2:4 semi-structured (stage 1 at `--sparsity 2:4`): two zeros in every group of four inputs of each block "
            "Linear, held through fine-tuning. NVIDIA sparse tensor cores (Ampere and newer) can run it through PyTorch's "
            "semi-structured tensors (`lotus.masks.to_semi_structured_`), but whether that is faster than dense depends on "
            "the kernels and the layer sizes: time it on the target GPU (`benchmarks/sparse24_gpu.py`). On CPUs and in "
            "ONNX Runtime the zeros bring no speed."
        ]
    else:
        lines = [
            "- Unstructured (stages 1 and 2): the Linear weights inside the transformer blocks"
            + (f" and {', '.join(cfg.prune.include)}" if cfg.prune.include else "")
            + f", ranked {cfg.prune.scope}ly by magnitude. The zeros make the weights compress well, but dense kernels "
            "(PyTorch, ONNX Runtime) still multiply them: no speed-up by itself.",
            "- 2:4 semi-structured sparsity (`--sparsity 2:4`) is the pattern NVIDIA sparse tensor cores (Ampere and newer) "
            "can run; this run does not hold it.",
        ]
    if m.get("structure"):
        lines.append(
            f"- Structured: heads per block {m['structure']['num_heads']}, MLP widths {m['structure']['mlp_hidden']} "
            f"({cfg.structure.importance} importance, {cfg.structure.scope} scope). The layers are physically smaller: "
            f"parameters and multiply-adds fall to about x{m['parameters_ratio']:.2f}, on any hardware."
        )
    lines.append(
        "- Patch dropping (`drop` at inference, `lotus export onnx`): compute falls with the patches skipped, on any hardware."
    )
    return lines


def _stage_notes(cfg: Any, done: dict[str, dict[str, Any]]) -> dict[str, str]:
    """One line per stage for the stages table."""
    prune, isp = done["prune"], done.get("isp", {})
    essential = (
        f" (essential sparsity {prune['essential_sparsity']:g}, chosen on the validation split)"
        if prune.get("essential_sparsity") is not None
        else ""
    )
    return {
        "baseline": "trained here" if done["baseline"].get("history") else f"loaded from {done['baseline'].get('checkpoint')}",
        "tickets": f"{done['tickets']['num_keep']} of {done['tickets']['num_patches']} patches kept per image; "
        f"{done['tickets']['outlier_patches']} high-norm outlier patches re-scored" + _coverage_note(done["tickets"]),
        "prune": f"one-shot to {prune['sparsity']:.4f}{essential}",
        "isp": f"Instant Soup Pruning to {_fmt(isp.get('sparsity'), '.4f')}"
        + (", rounds evaluated on the validation split" if isp.get("val_accuracy") is not None else ""),
        "structure": f"parameters x{_fmt(done.get('structure', {}).get('parameters', {}).get('ratio'), '.3f')}",
        "finetune": f"{len(done.get('finetune', {}).get('history', []))} epochs "
        + ("drop-aware (the patches the exported graph keeps)" if cfg.finetune.drop_aware else "on the lottery data")
        + (f", distilled from {_teacher(cfg.finetune)}" if cfg.finetune.distill else "")
        + ", masks held",
        "evaluate": "whole images",
    }


def _coverage_note(tickets: dict[str, Any]) -> str:
    """'; on the object box: ...' when the tickets were measured against object boxes (--boxes)."""
    coverage = tickets.get("object_coverage")
    if not coverage:
        return ""
    return (
        f"; {100 * coverage['kept_on_object']:.1f}% of kept patches on the object box, "
        f"{100 * coverage['object_kept']:.1f}% of its patches kept ({coverage['images']} images)"
    )


def _stage_table(cfg: Any, done: dict[str, dict[str, Any]]) -> list[str]:
    """Validation and test accuracy, wall time and throughput of every finished stage."""
    notes = _stage_notes(cfg, done)
    lines = [
        "| stage | validation accuracy | test accuracy | seconds | images/s | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, rec in done.items():
        if name == "report":
            continue
        lines.append(
            f"| {name} | {_pct(rec.get('val_accuracy'))} | {_pct(rec.get('accuracy'))} | {_fmt(rec.get('seconds'), '.1f')} | "
            f"{_fmt(rec.get('images_per_second'), '.0f')} | {notes.get(name, '')} |"
        )
    return lines


def _finetune_saving(done: dict[str, dict[str, Any]], m: dict[str, Any]) -> list[str]:
    """The training time fewer patches saved in fine-tuning, from this run's step timing."""
    if m["finetune_seconds_saved"] is None:
        return []
    ratio = done["finetune"]["dense_step_ratio"]
    return [
        "",
        f"Fine-tuning on the kept patches took {m['finetune_train_seconds']:.1f} s of training; a dense training "
        f"step measured side by side takes {ratio:.2f}x such a step, so dense fine-tuning would have taken about "
        f"{m['dense_finetune_seconds_estimate']:.1f} s: {m['finetune_seconds_saved']:.1f} s saved.",
    ]


def _layer_table(done: dict[str, dict[str, Any]]) -> list[str]:
    layers = done["evaluate"].get("layers", {})
    if not layers:
        return []
    return [
        "",
        "## Measured sparsity per layer",
        "",
        "| weight | sparsity |",
        "|---|---|",
        *(f"| `{name}` | {value:.4f} |" for name, value in layers.items()),
    ]


def _files(done: dict[str, dict[str, Any]]) -> str:
    """What the run folder holds."""
    return (
        "Files: `model.safetensors` + `model.json` (the compressed model, masks included), `metrics.json`, "
        "`history.csv`, `tickets/` (with `tickets.png`), `stage1/`"
        + (", `stage2/`" if "isp" in done else "")
        + (", `sweep/`" if done["prune"].get("essential_sparsity") is not None else "")
        + (", `structured/`" if "structure" in done else "")
        + ", `finetune/`, `accuracy_per_stage.png`, `finetune.png`."
    )
