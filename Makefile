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

# The main job on the embedded default data (scikit-learn's digits), offline.
demo: install
	$(BIN)/lotus train --data digits --out runs/demo
	$(BIN)/lotus eval runs/demo --data digits
	@echo "demo results: runs/demo (model.safetensors + model.json, metrics.jsonl)"

test: install
	$(BIN)/python -m pytest -q

# Benchmarks print figures and write benchmarks/results/*.json; they need ../shared for CIFAR-10.
bench: install
	$(BIN)/python benchmarks/token_gather_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
