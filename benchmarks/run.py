"""List the benchmarks, or run one by name: `make bench` lists, `make bench NAME=... [ARGS=...]` runs.

Each benchmark is a script in this folder that prints its figures and writes JSON under
benchmarks/results/ (`make results` renders docs/results.md from them). The table says what each
needs, so a run fits the machine at hand (CIFAR-10 training runs take about 13 minutes an epoch
on 2 CPU cores: their grids belong on a GPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> what it needs; "CPU" needs nothing beyond the install
BENCHMARKS = {
    "token_gather_step": "CPU",
    "train_throughput": "CPU (ViT-Ti/16, batch 32); --device cuda: a GPU",
    "data_memory": "CPU; about 5 GB of memory and 350 MB of disk for the generated folders",
    "tickets_scoring_speed": "CPU",
    "tome_latency": "CPU; exports its graphs (a few minutes; --no-onnx skips them)",
    "serve_latency": "CPU; --synthetic, or an exported model",
    "serve_overhead_split": "CPU; an exported model",
    "serve_hostile": "CPU; the synthetic model (exported once) or an exported one; a few minutes (--quick: one)",
    "serve_soak": "CPU; the synthetic model (exported once) or an exported one; --minutes (10)",
    "cifar10_baseline": "CIFAR-10 archive in ../shared/data",
    "cifar10_tickets": "CIFAR-10, a baseline checkpoint",
    "cifar10_tickets_finetune": "CIFAR-10, a baseline checkpoint",
    "tickets_keep_accuracy": "CIFAR-10, a baseline checkpoint",
    "cifar10_compress": "CIFAR-10, a baseline checkpoint",
    "cifar10_select_block": "CIFAR-10, a trained checkpoint (default: the frontier's dense model)",
    "cifar10_structured": "CIFAR-10, a baseline checkpoint",
    "structured_peers": "a baseline checkpoint and its data; torch-pruning (the dev extra)",
    "frontier": "a baseline checkpoint and its data; structured_peers' result; 1 epoch of fine-tuning per model",
    "cluttered_cifar10": "CIFAR-10 (writes a dataset)",
    "sparse24_gpu": "an NVIDIA GPU (Ampere or newer)",
    "epoch_time": "an ImageFolder (default: Tiny-ImageNet-100 unpacked into data/); about an hour on 2 CPU cores",
    "ticket_coverage": "Tiny-ImageNet-100 (boxes.tsv), a baseline checkpoint",
    "scorer_coverage": "Tiny-ImageNet-100 (boxes.tsv); trains its own scorer (5 to 7 minutes an epoch on 2 CPU cores)",
    "tiny_imagenet_tickets": "Tiny-ImageNet-100, a baseline checkpoint; about 10 minutes per run and seed on 2 CPU cores",
    "ticket_views": "the models tiny_imagenet_tickets fine-tuned, under runs/",
}


def summary(name: str) -> str:
    """The first line of a benchmark's docstring."""
    text = (HERE / f"{name}.py").read_text()
    return text.split('"""', 2)[1].strip().splitlines()[0]


def main(argv: list[str]) -> int:
    if not argv:
        width = max(map(len, BENCHMARKS))
        for name, needs in BENCHMARKS.items():
            print(f"{name:<{width}}  {summary(name)}\n{'':<{width}}  needs: {needs}")
        print("\nrun one: make bench NAME=token_gather_step [ARGS='--rounds 3']")
        return 0
    name, *args = argv
    if name not in BENCHMARKS:
        print(f"error: no benchmark {name!r}: `make bench` lists them", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(HERE / f"{name}.py"), *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
