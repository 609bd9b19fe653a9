# One-command set-up: `make run` and `make test` create .venv, install everything (pip + the Debian
# packages for real Fashion-MNIST, tcmalloc for the Ray workers and the headless browser) and then do
# their job.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=
APT_INSTALL = $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q

.PHONY: setup data malloc compiler browser packages test run lint format smoke clean

setup: $(STAMP) data malloc compiler

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(APT_INSTALL) dataset-fashion-mnist

# ray.allocator=auto preloads it into the Ray workers (retraining ran 1.1x faster than on glibc's malloc)
malloc: $(TCMALLOC)

$(TCMALLOC):
	$(APT_INSTALL) libtcmalloc-minimal4

browser: $(CHROMIUM)

# dnad's native CPU kernels (dnad/native) are built with it on first use; without one, PyTorch's kernels
compiler:
	@command -v g++ >/dev/null || command -v c++ >/dev/null || { $(APT_INSTALL) g++; }

$(CHROMIUM):
	$(APT_INSTALL) chromium

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# pip (one core) and apt (network, dpkg) at the same time, then lint and the suite in one process: two
# pytest-xdist workers on these two cores took longer than one (torch's threads of both fight for them)
test:
	$(MAKE) --no-print-directory -j2 $(STAMP) packages
	$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest -q --durations=15

# the Debian packages of `data`, `malloc`, `browser` and a C++ compiler (dnad's native CPU kernels) in one
# apt transaction (two would wait on dpkg's lock)
packages:
	@pkgs=""; [ -e $(FMNIST) ] || pkgs="$$pkgs dataset-fashion-mnist"; \
	[ -e $(TCMALLOC) ] || pkgs="$$pkgs libtcmalloc-minimal4"; \
	command -v g++ >/dev/null || command -v c++ >/dev/null || pkgs="$$pkgs g++"; \
	[ -e $(CHROMIUM) ] || pkgs="$$pkgs chromium"; \
	if [ -n "$$pkgs" ]; then $(APT_INSTALL) $$pkgs; fi

run: setup
	$(PY) pipeline/run.py $(ARGS)

smoke: setup
	$(PY) pipeline/run.py --smoke-test $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
