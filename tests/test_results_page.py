"""docs/results.md and README's headline block are rendered from benchmarks/results/ and must not drift."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
render_results = importlib.util.module_from_spec(_spec)
sys.modules["render_results"] = render_results  # dataclasses look their module up there
_spec.loader.exec_module(render_results)

GPU = {"cpu": "x86_64", "torch_threads": 2, "torch": "2.11.0+cu130", "gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-26 13:00"}
CPU = {"cpu": "x86_64", "torch_threads": 2, "torch": "2.14.1+cu130", "gpu": None, "date": "2026-11-25 16:03"}
CURVES = "h100/cifar10_tickets/epochs5/curves-drop0.5.png"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def fake_results(root: Path, step_fraction: float, random_accuracy: float = 55.85) -> None:
    """A tiny results tree: one step timing, two ticket runs and the plot the page links."""
    rows = [
        {"keep_ratio": 1.0, "num_keep": 64, "token_ratio": 1.0, "step_seconds": 2.0, "fraction_of_dense": 1.0},
        {
            "keep_ratio": 0.5,
            "num_keep": 32,
            "token_ratio": 0.508,
            "step_seconds": 2.0 * step_fraction,
            "fraction_of_dense": step_fraction,
        },
    ]
    write_json(root / "token_gather_step.json", {"machine": CPU, "model": "tiny", "batch_size": 128, "rounds": 5, "rows": rows})
    for name, select, drop, accuracy in (("full", "full", 0.0, 57.66), ("random-0.5", "random", 0.5, random_accuracy)):
        run = {
            "machine": GPU,
            "select": select,
            "drop": drop,
            "seed": 0,
            "train": {"epochs": 1, "batch_size": 128, "seed": 0},
            "history": [{"epoch_seconds": 30.0, "test_accuracy": accuracy}],
        }
        write_json(root / f"h100/cifar10_tickets/epochs5/{name}.json", run)
    (root / CURVES).write_bytes(b"\x89PNG not really")


def test_committed_page_matches_the_results(capsys):
    """docs/results.md, its images and README's headline block are what the renderer writes today."""
    assert render_results.main(["--check"]) == 0, capsys.readouterr().err


def test_page_follows_the_json_and_check_catches_drift(tmp_path, capsys, monkeypatch):
    # the picture is drawn for real in the next test; here a stand-in keeps four renders fast
    monkeypatch.setattr(
        render_results,
        "draw_headline",
        lambda data, path: path.parent.mkdir(parents=True, exist_ok=True) or path.write_bytes(b"png"),
    )
    results, docs, readme = tmp_path / "results", tmp_path / "docs", tmp_path / "README.md"
    readme.write_text(f"# Project\n\n{render_results.START}\nold figures\n{render_results.END}\n\nmore\n")
    args = ["--results", str(results), "--docs", str(docs), "--readme", str(readme)]
    fake_results(results, step_fraction=0.504)

    assert render_results.main(args) == 0
    page = (docs / "results.md").read_text()
    assert "**0.504** |" in page and "55.85" in page and "NVIDIA H100 80GB HBM3" in page
    assert "benchmarks/results/token_gather_step.json" in page
    copy = docs / "img/results" / CURVES.replace("/", "-")
    assert f"(img/results/{copy.name})" in page and copy.read_bytes() == (results / CURVES).read_bytes()
    assert (docs / "img/headline.png").stat().st_size > 0
    assert "0.504x the time of a full step" in readme.read_text() and "old figures" not in readme.read_text()
    assert readme.read_text().endswith(f"{render_results.END}\n\nmore\n")
    assert render_results.main([*args, "--check"]) == 0

    # a changed figure in the JSON makes the page stale, and rendering again shows the new figure
    fake_results(results, step_fraction=0.612, random_accuracy=54.10)
    capsys.readouterr()
    assert render_results.main([*args, "--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.md" in err and "make results" in err
    assert render_results.main(args) == 0
    page = (docs / "results.md").read_text()
    assert "**0.612** |" in page and "54.10" in page and "0.504" not in page and "55.85" not in page
    assert render_results.main([*args, "--check"]) == 0

    # a copied image that differs from its source, or is missing, fails the check too
    (results / CURVES).write_bytes(b"\x89PNG another plot")
    assert render_results.main([*args, "--check"]) == 1
    assert copy.name in capsys.readouterr().err
    render_results.main(args)
    copy.unlink()
    assert render_results.main([*args, "--check"]) == 1


def test_readme_without_markers_is_left_alone(tmp_path, capsys):
    results, docs, readme = tmp_path / "results", tmp_path / "docs", tmp_path / "README.md"
    fake_results(results, step_fraction=0.5)
    readme.write_text("# Project\n")
    args = ["--results", str(results), "--docs", str(docs), "--readme", str(readme)]
    assert render_results.main(args) == 0
    assert "no" in capsys.readouterr().out and readme.read_text() == "# Project\n"
    assert (docs / "img/headline.png").read_bytes().startswith(b"\x89PNG")  # drawn by matplotlib
    assert render_results.main([*args, "--check"]) == 0


def frontier_point(model: str, family: str, drop: float, val: float, test: float, fraction: float) -> dict:
    return {
        "model": model,
        "family": family,
        "drop": drop,
        "merge": 0,
        "val_accuracy": val,
        "test_accuracy": test,
        "fraction_of_dense": {"64": fraction},
    }


def test_readme_shows_each_datasets_longest_frontier_and_its_stacked_model_under_a_quarter(tmp_path):
    """Per dataset, the frontier fine-tuned longest; the stacked point chosen on validation among
    those at or under 0.25x, not the best on test, nor one over the latency."""
    points = [
        frontier_point("dense", "dense", 0.0, 60.0, 61.0, 1.0),
        frontier_point("stacked-int8", "stacked", 0.5, 64.0, 62.0, 0.287),  # best, but over 0.25x
        frontier_point("stacked-int8", "stacked", 0.7, 61.0, 60.5, 0.229),  # best on test under it
        frontier_point("stacked-distilled-dense-int8", "stacked-distilled-dense", 0.7, 62.0, 59.8, 0.229),
    ]
    for name, epochs, data in (("a", 1, "cifar10"), ("b", 3, "cifar10"), ("c", 1, "tiny-imagenet-100")):
        write_json(
            tmp_path / f"frontier_{name}.json",
            {"machine": CPU, "data": f"data/{data}", "finetune_epochs": epochs, "points": points},
        )
    src = render_results.Source(tmp_path)
    assert render_results.longest_frontiers(src) == ["frontier_b.json", "frontier_c.json"]
    what, figure, _, budget = render_results.stacked_headline(src, "frontier_b.json")
    assert "<= 0.25x" in what and "3 epoch(s)" in budget
    assert figure == "59.80% (drop 0.7, distilled from the fine-tuned dense model) at 0.229x; dense 61.00% (-1.20)"
    assert render_results.stacked_headline(src, "frontier_b.json", target=0.2) is None
