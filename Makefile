# `make test` and `make toy` set the environment up first; re-running them is cheap because each
# step leaves a stamp that is only stale when its inputs change.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
REQS := requirements/reference-stack.txt
CSRC := $(shell find projects/PETR/petr/layers/csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')
# python3.10 from PATH, or from pyenv when its shim is not set to 3.10.
PYTHON310 ?= $(shell for p in python3.10 $$HOME/.pyenv/versions/3.10*/bin/python3.10; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && { echo $$p; break; }; done)

.PHONY: setup test lint toy clean-build

setup: $(VENV)/.stamp-build

$(VENV)/.stamp-venv:
	@test -n "$(PYTHON310)" || { echo "python3.10 not found: install CPython 3.10" >&2; exit 1; }
	$(PYTHON310) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" "setuptools>=64" wheel
	touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-venv $(REQS)
	$(PIP) install -r $(REQS)
	touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py pyproject.toml $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Train the toy model on CPU: AP of the untrained model, training with periodic evaluation, then
# the learning curve and drawings of validation predictions.
TOY_OUT := output/petr_toy
toy: setup
	$(PY) tools/train_net.py --config-file configs/petr_toy.yaml --eval-only \
		OUTPUT_DIR $(TOY_OUT)/untrained
	$(PY) tools/train_net.py --config-file configs/petr_toy.yaml OUTPUT_DIR $(TOY_OUT)
	$(PY) tools/toy_report.py $(TOY_OUT)

clean-build:
	rm -rf build $(VENV)/.stamp-build projects/PETR/petr/_C*.so
