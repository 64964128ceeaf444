#!/usr/bin/env bash
# Fills .device/ (git-ignored) with what tools/gpu_check.sh needs on a GPU machine that has no
# network, no Detectron2 and none of its dependencies: the vendored Detectron2 archive and CPython
# 3.12 wheels of the missing packages, at the versions of this checkout's default stack (.venv).
# Run here, after `make setup`:  bash tools/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ARCHIVE=${DETECTRON2_ARCHIVE:-../shared/vendor/detectron2-02b5c4e2.tar.gz}
# Missing on the GPU image (its own list: fvcore, iopath, yacs, omegaconf, hydra-core, termcolor,
# pycocotools, xtcocotools), plus the one dependency of theirs it lacks (antlr4, for hydra).
PACKAGES="fvcore iopath yacs omegaconf hydra-core antlr4-python3-runtime termcolor pycocotools
xtcocotools"
rm -rf .device && mkdir -p .device/wheels
cp "$ARCHIVE" .device/
pins=$($PY -m pip freeze | grep -iE "^($(echo $PACKAGES | tr ' ' '|' | sed 's/-/[-_]/g'))==")
# Built here without isolation (fvcore, antlr4 and xtcocotools are sdists; xtcocotools' build
# needs numpy and Cython, which .venv has), with this machine's CPython 3.12, like the GPU image.
$PY -m pip wheel --quiet --no-deps --no-build-isolation -w .device/wheels $pins
ls -la .device .device/wheels
du -sh .device
