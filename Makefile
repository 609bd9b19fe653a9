# One-command set-up: `make run` and `make test` create .venv, install everything (pip + the Debian
# packages for real Fashion-MNIST and the headless browser) and then do their job.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=
APT_INSTALL = $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q

.PHONY: setup data browser packages test run lint format smoke clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(APT_INSTALL) dataset-fashion-mnist

browser: $(CHROMIUM)

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

# the Debian packages of `data` and `browser` in one apt transaction (two would wait on dpkg's lock)
packages:
	@pkgs=""; [ -e $(FMNIST) ] || pkgs="$$pkgs dataset-fashion-mnist"; \
	[ -e $(CHROMIUM) ] || pkgs="$$pkgs chromium"; \
	if [ -n "$$pkgs" ]; then $(APT_INSTALL) $$pkgs; fi

run: setup
	$(PY) pipeline/run.py $(ARGS)

smoke: setup
	$(PY) pipeline/run.py --smoke-test $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
