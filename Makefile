# hdn: set up a local virtual environment, then run the tests, the workbook or the benchmark.
#
#   make test    create .venv if missing, install, run the whole test suite (tests + notebooks);
#                HDN_LIVE_STEPS=100 shortens notebook 05's live training (1200 steps otherwise)
#   make lab     create .venv if missing, install, open JupyterLab at the repository's root on
#                notebooks/ (so that the notebooks' links to docs/ open); as root it adds
#                --allow-root. LAB_ARGS passes more options, e.g. make lab LAB_ARGS=--no-browser
#   make bench   create .venv if missing, install, run the speed benchmark (benchmarks/bench.py)
#   make gpu-check   on a CUDA machine: tests, host syncs, speed, a training step and notebook 05
#                on the GPU (benchmarks/gpu_check.py; results in build/gpu-check)
#   make test-outside-clone   build the wheel, install it into a fresh venv outside the repository,
#                run the notebooks alone there (strict nbval, generic CPU kernels, one thread)
#   make book          build the static site (build/book/html) and check it in headless Chromium
#   make book-html     only build the site: notebooks with their stored outputs, docs/*.md, API reference
#                      (needs npm, for MathJax: installed with apt-get when missing)
#   make book-check    check the built site: pages load, images show, local links resolve, no
#                      console errors, nothing fetched from outside, maths typeset, nothing wider
#                      than its column, no test-harness comments, well-formed API entries;
#                      screenshots in build/book/screenshots (needs npm and chromium)
#   make test-browser  run the notebooks in JupyterLab in headless Chromium, move every widget
#                      control, check the images change without errors; times in build/browser
#                      (needs npm and chromium)
#   make browser-deps  install what the browser targets need when missing: Debian's chromium and
#                      npm (apt-get, as root), then the packages of tests/browser (npm ci)
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
.PHONY: test lab bench gpu-check clean test-outside-clone book book-html book-check test-browser browser-deps

test: $(STAMP)
	HDN_LIVE_STEPS=100 $(VPY) -m pytest $(PYTEST_ARGS)

# Rooted at the repository, so that a notebook's link to ../docs/notation.md opens; the browser
# opens on notebooks/. Jupyter refuses to run as root (common in containers) without --allow-root.
LAB_ARGS ?=
LAB_ROOT_FLAG := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)

lab: $(STAMP)
	$(VPY) -m jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks \
		$(LAB_ROOT_FLAG) $(LAB_ARGS)

bench: $(STAMP)
	$(VPY) benchmarks/bench.py

gpu-check: $(STAMP)
	$(VPY) benchmarks/gpu_check.py --device cuda --out build/gpu-check

test-outside-clone: $(STAMP)
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" bash .ci/outside_clone.sh

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install $(TORCH)
	$(VPY) -m pip install -e ".[dev]"
	touch $(STAMP)

# --- the static site and the browser checks --------------------------------------------
# Chromium and npm (with node) are Debian's, installed by apt-get when missing (as root);
# playwright-core drives Chromium and downloads no browser of its own. npm ci installs
# tests/browser/package-lock.json (playwright-core, and MathJax, which the site serves
# itself): book-html needs npm for MathJax, book-check and test-browser need both.
# Each step is skipped when already done.
CHROMIUM ?= /usr/bin/chromium
BROWSER_DIR := tests/browser
NODE_STAMP := $(BROWSER_DIR)/node_modules/.installed
DOCS_STAMP := $(VENV)/.installed-docs
BOOK_DIR := build/book

$(CHROMIUM):
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

$(NODE_STAMP): $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	command -v npm >/dev/null || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends npm; }
	cd $(BROWSER_DIR) && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

browser-deps: $(CHROMIUM) $(NODE_STAMP)

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(VPY) -m pip install -e ".[dev,docs]"
	touch $(DOCS_STAMP)

book: book-html book-check

book-html: $(DOCS_STAMP) $(NODE_STAMP)
	$(VPY) -m sphinx -b html -c docs --keep-going . $(BOOK_DIR)/html

book-check: browser-deps
	HDN_CHROMIUM=$(CHROMIUM) node $(BROWSER_DIR)/book.check.mjs $(BOOK_DIR)/html

test-browser: $(STAMP) browser-deps
	HDN_PYTHON=$(abspath $(VPY)) HDN_CHROMIUM=$(CHROMIUM) node $(BROWSER_DIR)/widgets.test.mjs

clean:
	rm -rf build dist .pytest_cache .ruff_cache .ipynb_checkpoints notebooks/.ipynb_checkpoints
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d \
		-exec rm -rf {} +
