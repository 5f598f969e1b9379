"""Peak memory of `lotus train` on a 224-px ImageFolder of 2,000 and of 20,000 JPEGs, with the
split held in memory and streamed from its files, side by side.

Each run trains a one-block ViT-Tiny/16 (the data layer is what is measured, not the model):
memory is sampled every 0.2 s as the proportional set size (PSS) summed over `lotus train` and
its loader workers, so pages the forked workers share are counted once. The run is stopped
(killed with its workers) `--train-seconds` after it reports its training data, by when the
in-memory path has decoded everything and the streaming path has reached its steady state.

    python benchmarks/data_memory.py [--sizes 2000 20000] [--train-seconds 40] [--workers 2]

Writes benchmarks/results/data_memory.json. The folders are generated once under data/.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, generated_folder, write_result

LOTUS = str(Path(sys.executable).with_name("lotus"))


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pss = rss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return pss, rss


def measure(root: Path, loader: str, workers: int, train_seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = [LOTUS, "train", "--data", str(root), "--img-size", "224", "--loader", loader, "--workers", str(workers)]
        args += ["--depth", "1", "--epochs", "1", "--batch-size", "32", "--val-fraction", "0", "--out", f"{out}/run"]
        log = Path(out) / "stderr.txt"
        with log.open("w") as stderr:
            env = {**os.environ, "COLUMNS": "300"}
            process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
            start, trained_from, peak_pss, peak_rss, trace = time.monotonic(), None, 0, 0, []
            while process.poll() is None:
                pss, rss = tree_memory(process.pid)
                peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
                now = time.monotonic() - start
                trace.append((round(now, 1), pss))
                if trained_from is None and "training data:" in log.read_text():
                    trained_from = now
                if trained_from is not None and now - trained_from > train_seconds:
                    os.killpg(process.pid, signal.SIGKILL)  # the run and its loader workers: measured enough
                    process.wait()
                    break
                time.sleep(0.2)
        said = " ".join(log.read_text().split())
        if trained_from is None:
            raise SystemExit(f"lotus train ended before training:\n{said[-2000:]}")
    line = said[said.index("training data:") :].split(";")[0]
    return {
        "loader": loader,
        "peak_pss_bytes": peak_pss,
        "peak_rss_bytes": peak_rss,
        "seconds_to_first_step": trained_from,
        "said": line,
        "trace": trace[:: max(1, len(trace) // 200)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--train-seconds", type=float, default=40)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    rows = []
    print(f"{'images':>7} {'loader':>7} {'decoded GB':>10} {'peak PSS GB':>11} {'peak/decoded':>12}")
    for n in args.sizes:
        root = generated_folder(ROOT / "data" / f"jpeg224-{n}", n)
        decoded = n * 3 * 224 * 224
        for loader in ("memory", "stream"):
            row = {"images": n, "decoded_bytes": decoded, **measure(root, loader, args.workers, args.train_seconds)}
            rows.append(row)
            print(
                f"{n:>7} {loader:>7} {decoded / 1e9:>10.2f} {row['peak_pss_bytes'] / 1e9:>11.2f} {row['peak_pss_bytes'] / decoded:>12.2f}"
            )
    growth = {}
    for loader in ("memory", "stream"):
        peaks = [r["peak_pss_bytes"] for r in rows if r["loader"] == loader]
        growth[loader] = peaks[-1] - peaks[0]
        print(f"{loader}: peak grows by {growth[loader] / 1e6:,.0f} MB from {args.sizes[0]:,} to {args.sizes[-1]:,} images")
    write_result(
        "data_memory",
        {
            "model": "vit_tiny_patch16_224, depth 1, img 224, batch 32",
            "workers": args.workers,
            "train_seconds": args.train_seconds,
            "rows": rows,
            "growth_bytes": growth,
        },
    )


if __name__ == "__main__":
    main()
