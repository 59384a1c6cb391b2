# hashexp — set-up, tests, runs and tables. `make test` and `make run` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.hashexp-installed
# torch/torchvision releases this project is tested with (served from local disk where available)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DEB_DIR := /usr/share/datasets/fashion-mnist
CLSH_SOURCES := $(wildcard clsh/*.pyx clsh/*.pxd clsh/src/*.cpp clsh/src/*.hpp clsh/src/*.h)

.PHONY: install data test test-all test-fast run results-table bench bench-deps clean help

help:
	@echo "make test           set up .venv, install hashexp[dev,search,deploy] (builds clsh), fetch data, run the whole test suite"
	@echo "make test-all       the suite plus the sweep over every torchvision classifier (slow)"
	@echo "make test-fast      the suite without the end-to-end runs (pytest -m \"not slow\")"
	@echo "make run            set up, get Fashion-MNIST, compare vanilla vs hashed MLP and print the table"
	@echo "make results-table  tables and plots from everything under outputs/"
	@echo "make bench          run the benchmarks in benchmarks/ (writes their markdown)"
	@echo "make data           install Fashion-MNIST (Debian package dataset-fashion-mnist)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(CLSH_SOURCES) | $(PY)
	$(BIN)/pip install --upgrade-strategy only-if-needed $(TORCH_SPEC)
	$(BIN)/pip install "setuptools>=69" wheel "Cython>=3.0" "numpy>=1.24"
	$(BIN)/pip install --no-build-isolation -e ".[dev,search,deploy]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST: Debian's package where apt exists; otherwise hashexp falls back to torchvision's downloader.
data:
	@if [ -f $(FMNIST_DEB_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST present in $(FMNIST_DEB_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "apt-get not found: set dataset.root=/path/to/idx-files or let torchvision download Fashion-MNIST"; \
	fi

test: install data
	$(PY) -m pytest -q -n 2 -m "not sweep" tests

test-all: install data
	$(PY) -m pytest -q -n 2 tests

test-fast: install
	$(PY) -m pytest -q -x -n 2 -m "not slow" tests

run: install data
	$(PY) -m hashexp.compare

results-table: install
	@mkdir -p outputs
	$(PY) -m hashexp.results outputs

bench-deps: install
	$(BIN)/pip install -e ".[bench]"

bench: bench-deps data
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build *.egg-info clsh/*.so clsh/_clsh.cpp .pytest_cache
