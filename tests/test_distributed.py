"""Under torchrun: two gloo processes on the CPU must hold the same weights, and write the tickets one process writes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline import tiny_recipe

from lotus.prune import ISPConfig

pytestmark = pytest.mark.slow  # every test here runs the pipeline or several processes

BIN = Path(sys.executable).parent
DIGEST = re.compile(r"rank (\d)/2 weights ([0-9a-f]{16})")


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(BIN / "lotus"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def digests_by_rank(stderr: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {0: [], 1: []}
    for rank, digest in DIGEST.findall(stderr):
        found[int(rank)].append(digest)
    return found


def test_two_gloo_processes_train_the_same_weights(tmp_path):
    proc = torchrun("train", "--epochs", "2", "--depth", "1", "--batch-size", "32", "--out", tmp_path / "run", cwd=tmp_path)
    found = digests_by_rank(proc.stderr)
    assert len(found[0]) == 1 and found[0] == found[1]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # written once, by rank 0
    assert proc.stdout.count('"epoch": 2') == 1


def test_compress_under_torchrun_keeps_the_processes_in_step(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", isp_target=0.5, isp=ISPConfig(copies=2, rounds=1))
    proc = torchrun("compress", "--recipe", recipe, "--out", tmp_path / "run", cwd=tmp_path)
    found = digests_by_rank(proc.stderr)
    assert len(found[0]) == 1 + 2 + 1  # baseline, two weak copies, fine-tuning
    assert found[0] == found[1]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert proc.stderr.count("[7/7] report") == 1  # one process speaks


def test_two_gloo_processes_write_the_tickets_one_process_writes(tmp_path):
    from test_cli import lotus

    from lotus.tickets import load_tickets, shard_positions

    lotus("train", "--epochs", "1", "--depth", "1", "--batch-size", "32", "--out", tmp_path / "base")
    scoring = ["tickets", "--checkpoint", tmp_path / "base", "--drop", "0.5", "--layers", "all"]
    lotus(*scoring, "--out", tmp_path / "one")
    proc = torchrun(*scoring, "--out", tmp_path / "two", cwd=tmp_path)
    assert proc.stderr.count("kept 8 of 16 patches") == 1  # one process speaks
    one, two = load_tickets(tmp_path / "one"), load_tickets(tmp_path / "two")
    assert torch.equal(one.scores, two.scores) and torch.equal(one.keep_idx, two.keep_idx)
    assert one.meta["outlier_patches"] == two.meta["outlier_patches"] and one.meta["data"] == two.meta["data"]
    shards = [shard_positions(1365, 256, r, 2) for r in range(2)]  # 6 batches of 256: 3 each, the last one short
    assert sorted(torch.cat(shards).tolist()) == list(range(1365)) and len(shards[1]) == 3 * 256 - (6 * 256 - 1365)
