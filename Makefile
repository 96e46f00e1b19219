# hdn: set up a local virtual environment, then run the tests, the workbook or the benchmark.
#
#   make test    create .venv if missing, install, run the whole test suite (tests + notebooks)
#   make lab     create .venv if missing, install, open JupyterLab on notebooks/
#   make bench   create .venv if missing, install, run the speed benchmark (python -m hdn.bench)
#   make test-outside-clone   build the wheel, install it into a fresh venv outside the repository,
#                run the notebooks alone there (strict nbval, generic CPU kernels, one thread)
#   make clean   remove build outputs and caches (keeps .venv; `rm -rf .venv` removes that too)
#
# PyTorch is installed first, from $(TORCH). The default names the release that this
# project's workplace holds as a local CPU wheel. Elsewhere pick any torch >= 2.1, e.g.
#   make test TORCH=torch
# TORCH is passed to `pip install` as arguments, so it can also choose the wheel index, e.g.
# PyTorch's smaller CPU-only wheels:
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
# The install runs once: .venv/.installed records it and is redone when pyproject.toml changes.

PYTHON ?= python3
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := test
.PHONY: test lab bench clean test-outside-clone

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

lab: $(STAMP)
	$(VPY) -m jupyter lab notebooks/

bench: $(STAMP)
	$(VPY) -m hdn.bench

test-outside-clone: $(STAMP)
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" bash .ci/outside_clone.sh

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install $(TORCH)
	$(VPY) -m pip install -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf build dist .pytest_cache .ruff_cache .ipynb_checkpoints notebooks/.ipynb_checkpoints
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d \
		-exec rm -rf {} +
