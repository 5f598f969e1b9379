"""The documentation stays true: the CLI reference matches the CLI, the README stays a front door,
the pages speak of LOTUS (not of how it was made), and every relative link leads to a file."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def _script(path: Path):
    """A script of the repository (not a package) loaded as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_reference():
    return _script(ROOT / "scripts" / "cli_reference.py")


def test_cli_reference_matches_the_cli():
    expected = _cli_reference().render()
    assert (DOCS / "cli.md").read_text() == expected, "docs/cli.md is out of date: run `make docs-cli`"


def test_cli_reference_covers_every_command():
    text = (DOCS / "cli.md").read_text()
    for command in (
        "train",
        "eval",
        "tickets",
        "compress",
        "export onnx",
        "export triton",
        "serve",
        "bench",
        "prune sweep",
        "prune isp",
    ):
        assert f"`lotus {command}`" in text


def test_cli_reference_check_mode(tmp_path):
    module = _cli_reference()
    stale = tmp_path / "cli.md"
    stale.write_text("# CLI reference\n")
    assert module.main(["--check", "--out", str(stale)]) == 1
    stale.write_text(module.render())
    assert module.main(["--check", "--out", str(stale)]) == 0


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into docs/"
    top = "\n".join(lines[:30])
    assert "make demo" in top and "make test" in top, "the two set-up commands belong on the README's first screen"


def test_every_benchmark_runs_by_name_and_is_listed_in_the_guide():
    module = _script(ROOT / "benchmarks" / "run.py")
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"common", "run"}
    assert scripts - set(module.BENCHMARKS) == set(), "benchmarks/run.py's BENCHMARKS must name every benchmark script"
    assert set(module.BENCHMARKS) - scripts == set(), "benchmarks/run.py names a benchmark that has no script"
    guide = (DOCS / "benchmarking.md").read_text()
    assert {name for name in scripts if f"| `{name}` |" not in guide} == set(), (
        "docs/benchmarking.md's table must list every benchmark"
    )


def test_readme_has_the_headline_block():
    text = README.read_text()
    start, end = "<!-- results:headline:start -->", "<!-- results:headline:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    assert text.index(start) < text.index(end)
    assert "docs/img/headline.png" in text


# Words about how the project was made, not about what LOTUS does. "data lottery tickets" is a
# product term, and "ONNX Runtime session" a runtime object: neither is caught.
PROCESS_TALK = [
    r"\bissues?\s*#?\d",  # "issue 7", "issue #7"
    r"\(issues?\b",  # "(issue 6)"
    r"\b(the|this|that|these|those|our) issues?\b",  # "the issue asked for"
    r"\bthe brief\b",
    r"\bsprints?\b",
    r"\bticket\s*#\s*\d",
    r"\bthe lead\b",
    r"\banother helper\b",
    r"\ba lent\b",
    r"(?<!runtime )(?<!inference)\bsessions?\b",  # any session but ONNX Runtime's
]


def _prose(text: str) -> str:
    """Text without fenced code blocks and HTML comments (code may name anything)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_of_lotus_not_of_its_making(page):
    text = _prose(page.read_text())
    found = [m.group(0) for pattern in PROCESS_TALK for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    assert not found, f"{page.relative_to(ROOT)} talks about how the project was made: {found}"


def _links(text: str) -> list[str]:
    """Targets of Markdown links and images, and of HTML src/href, outside code."""
    text = _prose(text)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", text)
    return targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(page):
    broken, outside = [], []
    for target in _links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
        elif page.parent == DOCS and not path.is_relative_to(DOCS):
            outside.append(target)  # mkdocs cannot follow it: name the path in backticks instead
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"
    assert not outside, f"{page.relative_to(ROOT)} links outside docs/: {outside}"
