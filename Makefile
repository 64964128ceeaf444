# Two environments, each set up by the target that needs it:
#   .venv        the default stack: CPython 3.12, torch 2.14.1, Detectron2 built from upstream
#                source at DETECTRON2_COMMIT (make setup / test / toy / lint)
#   .venv-floor  the floor stack: CPython 3.10, torch 2.3.1, the sal-detectron2 0.7.2 wheel
#                (make setup-floor / test-floor)
# Re-running a target is cheap: each step leaves a stamp that is only stale when its inputs change.
SHELL := /bin/bash
CSRC := $(shell find projects/PETR/petr/layers/csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')

# A CPython of the given minor version from PATH, else from pyenv's versions folder.
find_python = $(shell for p in python$(1) $$HOME/.pyenv/versions/$(1).*/bin/python$(1); do \
	$$p -c 'import sys; assert sys.version_info[:2] == ($(subst .,$(comma),$(1)))' 2>/dev/null \
	&& { echo $$p; break; }; done)
comma := ,
PYTHON312 ?= $(call find_python,3.12)
PYTHON310 ?= $(call find_python,3.10)

# Where Detectron2's source comes from: upstream at a pinned commit, or the vendored `git archive`
# of that commit when it sits beside the checkout (machines that cannot reach GitHub).
DETECTRON2_COMMIT := 02b5c4e295e990042a714712c21dc79b731e8833
DETECTRON2_VENDORED := ../shared/vendor/detectron2-02b5c4e2.tar.gz
DETECTRON2_SRC ?= $(if $(wildcard $(DETECTRON2_VENDORED)),$(DETECTRON2_VENDORED),\
	git+https://github.com/facebookresearch/detectron2.git@$(DETECTRON2_COMMIT))

VENV := .venv
PY := $(VENV)/bin/python
FLOOR := .venv-floor
FLOOR_PY := $(FLOOR)/bin/python

.PHONY: setup setup-floor test test-fast test-floor lint toy clean-build FORCE

setup: $(VENV)/.stamp-build
setup-floor: $(FLOOR)/.stamp-build

# --- default stack -------------------------------------------------------------------------------
$(VENV)/.stamp-venv:
	@test -n "$(PYTHON312)" || { echo "python3.12 not found: install CPython 3.12" >&2; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	touch $@

# xtcocotools ships only an sdist for 3.12 that imports numpy and Cython without declaring them,
# so the build tools come first and the sdists build without isolation.
$(VENV)/.stamp-deps: $(VENV)/.stamp-venv requirements/default-stack.txt
	$(PY) -m pip install -c requirements/default-stack.txt setuptools wheel numpy cython
	$(PY) -m pip install --no-build-isolation -r requirements/default-stack.txt
	touch $@

# Rewritten only when DETECTRON2_SRC changes, so that a new source rebuilds Detectron2.
$(VENV)/.detectron2-src: FORCE | $(VENV)/.stamp-venv
	@echo '$(strip $(DETECTRON2_SRC))' | cmp -s - $@ || echo '$(strip $(DETECTRON2_SRC))' > $@

# Built against the torch above (no build isolation); its _C is CPU-only unless FORCE_CUDA=1.
$(VENV)/.stamp-detectron2: $(VENV)/.stamp-deps $(VENV)/.detectron2-src
	$(PY) -m pip install --no-build-isolation --no-deps "$$(cat $(VENV)/.detectron2-src)"
	$(PY) -c "from detectron2 import model_zoo, _C"
	touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-detectron2 setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

# --- floor stack ---------------------------------------------------------------------------------
$(FLOOR)/.stamp-venv:
	@test -n "$(PYTHON310)" || { echo "python3.10 not found: install CPython 3.10" >&2; exit 1; }
	$(PYTHON310) -m venv $(FLOOR)
	$(FLOOR_PY) -m pip install --quiet --upgrade "pip>=24"
	touch $@

$(FLOOR)/.stamp-deps: $(FLOOR)/.stamp-venv requirements/floor-stack.txt
	$(FLOOR_PY) -m pip install -r requirements/floor-stack.txt
	touch $@

$(FLOOR)/.stamp-build: $(FLOOR)/.stamp-deps setup.py pyproject.toml $(CSRC)
	$(FLOOR_PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

# --- use -----------------------------------------------------------------------------------------
test: setup
	$(PY) -m pytest -q -ra

# The suite without the tests marked slow (> ~30 s each): for the edit-test loop. CI runs `test`.
test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

test-floor: setup-floor
	$(FLOOR_PY) -m pytest -q -ra

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
	rm -rf build $(VENV)/.stamp-build $(FLOOR)/.stamp-build projects/PETR/petr/_C*.so
