"""Structured pruning by LOTUS (`lotus/structured.py`) against Torch-Pruning, at equal parameters.

From one baseline checkpoint, every method removes the same share of each block's attention
heads (--heads) and MLP neurons (--mlp), so every pruned model has the same widths and the
same parameter count:
- LOTUS: `prune_structured`'s importance scores (magnitude, activation, taylor), block scope;
- Torch-Pruning (`torch-pruning` on PyPI): `MetaPruner` with whole-head pruning
  (`prune_num_heads`, head dimensions kept) and MLP channel pruning, by its
  `GroupMagnitudeImportance` (L2) and `GroupTaylorImportance`; the residual width is left alone
  (`attn.proj`, `mlp.fc2`, the patch embedding and the head are ignored layers).
LOTUS's magnitude and Taylor scores are Torch-Pruning's since this benchmark found them better
than the ones it computed by hand (the committed result was measured before the switch), so
their rows now match Torch-Pruning's: a check that LOTUS cuts what MetaPruner cuts.
The activation and Taylor scores read the same --calib-images training images.

Each pruned model's accuracy is measured on the validation split (the split choices read) and
the test split (reported). The best importance of each library, by validation accuracy, is then
fine-tuned for --finetune-epochs at the same recipe and seeds (the baseline's recipe at half its
learning rate; one fine-tuning when both chose the same score, which cuts the same model), and the
paired difference over seeds is reported with its standard error.

    python benchmarks/structured_peers.py --baseline runs/frontier/cifar10/baseline --seeds 0,1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import ROOT, finetune, paired, write_result

from lotus.checkpoint import load_model
from lotus.data import DataConfig
from lotus.prune import calibration_batches, eval_loader, save_pruned, unit_scores
from lotus.structured import StructuredConfig, choose, shrink_
from lotus.train import TrainConfig, evaluate
from lotus.vit import count_parameters, structure_of


def prune_lotus(model: torch.nn.Module, meta: dict, data_cfg: DataConfig, cfg: StructuredConfig) -> torch.nn.Module:
    heads, neurons = unit_scores(model, cfg, data_cfg, meta["preprocess"], torch.device("cpu"))
    shrink_(model, choose(heads, neurons, cfg))
    return model


def prune_torch_pruning(model: torch.nn.Module, importance: str, batches: list, cfg: StructuredConfig) -> torch.nn.Module:
    """Whole heads and MLP neurons removed by Torch-Pruning; the result is a timm ViT with narrower blocks."""
    import torch_pruning as tp

    blocks = list(model.blocks)
    ignored = [model.head, model.patch_embed.proj, *(b.attn.proj for b in blocks), *(b.mlp.fc2 for b in blocks)]
    scorer = tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(
        model,
        batches[0][0][:2],
        importance=scorer,
        pruning_ratio=cfg.mlp,
        ignored_layers=ignored,
        num_heads={b.attn.qkv: b.attn.num_heads for b in blocks},
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=cfg.heads,
        unwrapped_parameters=[(model.cls_token, 2), (model.pos_embed, 2)],
    )
    if importance == "taylor":
        model.eval()
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            torch.nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    for b in blocks:  # timm's Attention reshapes by these
        b.attn.num_heads = pruner.num_heads[b.attn.qkv]
        b.attn.attn_dim = b.attn.num_heads * b.attn.head_dim
    return model


def prune_all(baseline: Path, data_cfg: DataConfig, cfg: StructuredConfig, work: Path) -> list[dict]:
    """Every (library, importance) pruned from `baseline`, saved under `work`, with its accuracies."""
    dense, meta = load_model(baseline, "cpu")
    batches = list(calibration_batches(data_cfg, meta["preprocess"], cfg))  # the images LOTUS's scores read
    loaders = {split: eval_loader(meta, data_cfg, split) for split in ("val", "test")}
    rows = []
    for library, importance in (
        ("lotus", "magnitude"),
        ("lotus", "activation"),
        ("lotus", "taylor"),
        ("torch-pruning", "magnitude"),
        ("torch-pruning", "taylor"),
    ):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        if library == "lotus":
            prune_lotus(model, meta, data_cfg, replace(cfg, importance=importance))
        else:
            prune_torch_pruning(model, importance, batches, cfg)
        seconds = time.perf_counter() - start
        acc = {split: evaluate(model, loader, torch.device("cpu"))["accuracy"] for split, loader in loaders.items()}
        out = work / f"structured-{library}-{importance}"
        save_pruned(out, model, meta, None, acc["val"], "val", pruning={"stage": "structured", "library": library})
        row = {
            "library": library,
            "importance": importance,
            "checkpoint": str(out),
            "seconds": seconds,
            "parameters": count_parameters(model),
            "structure": structure_of(model),
            "val_accuracy": acc["val"],
            "test_accuracy": acc["test"],
        }
        print(json.dumps({k: v for k, v in row.items() if k != "structure"}), flush=True)
        rows.append(row)
    if len({r["parameters"] for r in rows}) != 1:
        raise SystemExit(f"the pruned models differ in size: {[r['parameters'] for r in rows]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs/frontier/cifar10/baseline")
    p.add_argument("--heads", type=float, default=1 / 3, help="Share of each block's heads removed.")
    p.add_argument("--mlp", type=float, default=0.5, help="Share of each block's MLP neurons removed.")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--name", default="structured_peers", help="Result file name under benchmarks/results.")
    args = p.parse_args()

    work = args.baseline.parent
    _, meta = load_model(args.baseline, "cpu")
    data_cfg = DataConfig(**meta["data"])  # as the baseline was trained: the same folder and validation hold-out
    cfg = StructuredConfig(heads=args.heads, mlp=args.mlp, calib_images=args.calib_images)
    rows = prune_all(args.baseline, data_cfg, cfg, work)
    chosen = {}
    for library in ("lotus", "torch-pruning"):
        chosen[library] = max((r for r in rows if r["library"] == library), key=lambda r: r["val_accuracy"])
    base = TrainConfig(**{k: v for k, v in meta["train"].items() if k in TrainConfig.__dataclass_fields__})
    # LOTUS's magnitude and Taylor choices are Torch-Pruning's (tests/test_structured.py checks it weight for
    # weight): when both libraries chose the same score, one fine-tuning serves both
    same = chosen["lotus"]["importance"] == chosen["torch-pruning"]["importance"]
    finetuned = {
        library: [
            finetune(row["checkpoint"], data_cfg, base, work / f"ft-structured-{library}-seed{seed}", args.finetune_epochs, seed)
            for seed in args.seeds
        ]
        for library, row in chosen.items()
        if not (same and library == "lotus")
    }
    finetuned.setdefault("lotus", finetuned["torch-pruning"])
    acc = {library: [r["test_accuracy"] for r in runs] for library, runs in finetuned.items()}
    result = {
        "data": data_cfg.name,
        "baseline": str(args.baseline),
        "baseline_test_accuracy": meta["metrics"]["test_accuracy"],
        "config": {
            "heads": args.heads,
            "mlp": args.mlp,
            "calib_images": args.calib_images,
            "scope": "block",
            "lotus_scores": "torch-pruning",
        },
        "pruned": rows,
        "chosen_by_validation": {library: row["importance"] for library, row in chosen.items()},
        "finetune": {"epochs": args.finetune_epochs, "seeds": args.seeds, "runs": finetuned},
        "finetuned_test_accuracy": {
            library: {"mean": statistics.mean(a), "stdev": statistics.stdev(a) if len(a) > 1 else None}
            for library, a in acc.items()
        },
        "torch_pruning_minus_lotus": paired(acc["lotus"], acc["torch-pruning"]),
    }
    write_result(args.name, result)


if __name__ == "__main__":
    main()
