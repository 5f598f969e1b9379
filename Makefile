# Two set-up commands for a fresh machine: `make demo` and `make test` (README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# onnxruntime (CPU) by default; `make install EXTRAS=gpu,dev` for onnxruntime-gpu.
EXTRAS ?= cpu,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo test test-fast lint format docs docs-cli results bench check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# The main job on the embedded default data (scikit-learn's digits), offline: the whole LOTUS
# pipeline (train the dense baseline, tickets, prune, fine-tune on lottery data, report).
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: install
	$(BIN)/lotus compress --sparsity 0.3 --drop 0.1 --out $(DEMO_OUT)
	@echo "demo results: $(DEMO_OUT)/report.md (metrics.json, model.safetensors, plots beside it)"

# The whole suite (CI runs this); test-fast skips the tests marked slow, for the edit loop.
test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python scripts/function_length.py

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The documentation site (mkdocs-material) into site/; warnings fail the build. (The variable
# silences mkdocs-material's banner about its own end of life, which is not a build warning.)
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Regenerate the generated pages: the CLI reference (from the Typer app) and the results page
# (from benchmarks/results/). Tests fail when either is out of date.
docs-cli: install
	$(BIN)/python scripts/cli_reference.py

results: install
	$(BIN)/python scripts/render_results.py

# `make bench` lists the benchmarks; `make bench NAME=token_gather_step [ARGS='--rounds 3']` runs one.
bench: install
	$(BIN)/python benchmarks/run.py $(NAME) $(ARGS)

# Everything CI checks.
check: lint docs test

clean:
	rm -rf $(VENV) runs site .pytest_cache
