# Two set-up commands for a fresh machine: `make demo` and `make test` (README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# onnxruntime (CPU) by default; `make install EXTRAS=gpu,dev` for onnxruntime-gpu.
EXTRAS ?= cpu,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo test bench clean

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

test: install
	$(BIN)/python -m pytest -q

# Benchmarks print figures and write benchmarks/results/*.json; they need ../shared for CIFAR-10.
bench: install
	$(BIN)/python benchmarks/token_gather_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
