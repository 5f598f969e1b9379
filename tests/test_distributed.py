import pytest

"""Training under torchrun: two gloo processes on the CPU must hold the same weights."""

import os
import re
import subprocess
import sys
from pathlib import Path

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
