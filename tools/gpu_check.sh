#!/usr/bin/env bash
# The GPU check, in one run on a machine with a CUDA GPU, Python 3.12 and torch >= 2.3, no network
# and no Detectron2. Prepare here with `bash tools/gpu_bundle.sh` (fills the git-ignored .device/),
# then run it there with .device carried, e.g. through this workplace's device tool:
#     run(command="bash tools/gpu_check.sh", carry=[".device"], timeout_s=540)
# It builds Detectron2 (CPU-only: PETR calls none of its _C functions) and petr._C with CUDA,
# runs `pytest -m cuda`, the deformable-attention benchmark on CUDA against the reference, and
# PETR-R50 at 800x1333: inference in fp32 and bf16, eager and compiled, and one training iteration
# at batch 2. Every figure goes under $OUT (default output/gpu_check). The measuring steps' limits
# add up to 6.75 minutes and each build is capped at 2.5; aimed at 8 minutes in all on 16 cores
# (an estimate: no GPU machine has run it yet).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
SITE=/tmp/petr-site
export PYTHONPATH=$SITE:$PWD/projects/PETR
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    tail -40 "$OUT/$name.txt"
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}

{ nvidia-smi -L; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0))"; nvcc --version | tail -1; } > "$OUT/env.txt"
cat "$OUT/env.txt"

t0=$SECONDS
$PY -m pip install -q --no-index --no-deps --no-compile --target $SITE .device/wheels/*.whl || exit 1
# No GPU visible to Detectron2's setup.py, so it builds its CPU-only _C.
CUDA_VISIBLE_DEVICES= timeout 150 $PY -m pip install -q --no-index --no-deps --no-build-isolation \
    --target $SITE .device/detectron2-*.tar.gz || exit 1
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 timeout 150 $PY setup.py -q build_ext --inplace || exit 1
$PY -c "import torch, petr._C as C; assert C.has_cuda(), 'petr._C built without CUDA'" || exit 1
echo "=== build: Detectron2 + petr._C (CUDA) in $((SECONDS - t0)) s"

step pytest_cuda 90 $PY -m pytest -q -ra -m cuda tests
step msda 60 $PY tools/benchmark_msda.py --device cuda --repeat 20
step msda_bf16 30 $PY tools/benchmark_msda.py --device cuda --dtype bfloat16 --repeat 20 --no-memory
BENCH=(tools/benchmark.py --config-file configs/petr_R50.yaml --devices cuda --warmup 3 --iters 20)
# Eager and compiled columns and Keypoint R-CNN, alternating in one process; then the eager
# per-stage times alone (their hooks synchronise at every stage boundary on CUDA).
step bench_infer 150 $PY "${BENCH[@]}" --precisions fp32 bf16 --compile --compare keypoint_rcnn
step bench_stages 30 $PY "${BENCH[@]}" --precisions fp32 --stages
step bench_train 45 $PY "${BENCH[@]}" --precisions fp32 bf16 --train --batch-size 2
exit $status
