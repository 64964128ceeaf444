"""PETR inference in eager PyTorch and in onnxruntime, side by side (tools/benchmark.py --backends).

Both runtimes run the same computation on the same padded (1, 3, H, W) float32 input and its
image_sizes: the exported graph (`petr.export.export_petr_onnx`, dynamic sizes, reference
deformable attention) in onnxruntime, and `PETRONNXWrapper` (the model's `predict` plus the
in-graph front and back doors) in eager PyTorch with the deformable-attention backend a user
gets (petr._C when built). Host-side resizing and Instances are left out: they are the same
code for both.

Latency: one process, the two runtimes alternating (the same load hits both), each with
`threads` intra-op threads (torch.set_num_threads, SessionOptions.intra_op_num_threads). Idle
onnxruntime threads do not spin (session.intra_op.allow_spinning 0), so that they take no core
from the PyTorch iteration that follows. onnxruntime runs with the session options every PETR
route uses (petr.utils.ort_session: no memory arena).
Memory: each runtime in a process of its own, as a deployment runs it: peak RSS (VmHWM) of
a process that imports only numpy and onnxruntime and runs the graph, against that of a process
that builds the PyTorch model and runs it. `python -m petr.benchmark.backends memory '<spec>'`
is that process (so no torch is imported at module level here).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from petr.utils.ort_session import ort_session

from .rss import peak_rss_mib

__all__ = ["BACKENDS", "measure_memory", "run_backends"]

BACKENDS = ("torch", "onnxruntime")


def _input(height: int, width: int, seed: int = 0):
    """A random 0-255 float32 image (1, 3, H, W) and its (1, 2) int64 size."""
    image = np.random.default_rng(seed).uniform(0, 255, (1, 3, height, width)).astype(np.float32)
    return image, np.array([[height, width]], dtype=np.int64)


def _torch_runner(spec: Dict, threads: int):
    """The eager wrapper of the configured model (fp32, CPU) and a function running it."""
    import torch

    from petr.export import PETRONNXWrapper

    from .measure import _build

    torch.set_num_threads(threads)
    _, model = _build({**spec, "mode": "inference", "device": "cpu", "precision": "fp32"})
    wrapper = PETRONNXWrapper(model.eval()).eval()
    image, sizes = (torch.from_numpy(a) for a in _input(spec["height"], spec["width"]))

    def run():
        with torch.no_grad():
            return wrapper(image, sizes)

    return wrapper, run


def _ort_runner(path: str, spec: Dict, threads: int):
    session = ort_session(path, threads, spin=False)
    image, sizes = _input(spec["height"], spec["width"])
    return lambda: session.run(None, {"image": image, "image_sizes": sizes})


def _time(run, warmup: int, iters: int) -> List[float]:
    for _ in range(warmup):
        run()
    return [_timed(run) for _ in range(iters)]


def _timed(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _stats(times: List[float]) -> Dict:
    return {"ms": 1000.0 * sum(times) / len(times), "ms_min": 1000.0 * min(times)}


def measure_memory(backend: str, spec: Dict, onnx_path: str = "") -> Dict:
    """In this process: build `backend`'s runtime, run warmup + iters inferences and return its
    peak RSS (MiB), the RSS once its libraries were imported (before the model or session) and
    whether torch was imported (never, for onnxruntime)."""
    threads = spec["threads"]
    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401  (the import's own memory is part of the baseline)

        baseline = peak_rss_mib()
        run = _ort_runner(onnx_path, spec, threads)
    elif backend == "torch":
        import detectron2.modeling  # noqa: F401
        import torch  # noqa: F401

        import petr.export  # noqa: F401

        baseline = peak_rss_mib()
        _, run = _torch_runner(spec, threads)
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _time(run, spec["warmup"], spec["iters"])
    return {
        "peak_rss_mib": peak_rss_mib(),
        "import_rss_mib": baseline,
        "torch_imported": "torch" in sys.modules,
    }


def _memory_in_subprocess(backend: str, spec: Dict, onnx_path: str) -> Dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "petr.benchmark.backends",
            "memory",
            backend,
            json.dumps(spec),
            onnx_path,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"{backend} memory process failed: {err[-1]}")
    return json.loads(lines[-1])


def run_backends(spec: Dict, backends=BACKENDS) -> Dict[str, Dict]:
    """Export the configured model (spec: config_file, opts, height, width, warmup, iters,
    threads) and time `backends` alternating in this process; then measure each one's memory in
    its own process. Returns, per backend, ms / ms_min per image, peak_rss_mib and import_rss_mib;
    "onnxruntime" also has export_s and the max |diff| of its scores against PyTorch's."""
    import torch

    from petr.export import export_petr_onnx
    from petr.layers import ms_deform_attn_backend

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"backends must be among {BACKENDS}, got {list(backends)}")
    threads = spec["threads"]
    wrapper, run_torch = _torch_runner(spec, threads)
    runners, result = {}, {b: {} for b in backends}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "petr.onnx")
        if "onnxruntime" in backends:
            t0 = time.perf_counter()
            export_petr_onnx(wrapper.model, path, spec["height"], spec["width"])
            result["onnxruntime"]["export_s"] = time.perf_counter() - t0
            torch.set_num_threads(threads)  # the exporter may change it
            runners["onnxruntime"] = _ort_runner(path, spec, threads)
            diff = np.abs(runners["onnxruntime"]()[0] - run_torch()[0].numpy()).max()
            result["onnxruntime"]["max_score_diff"] = float(diff)
        if "torch" in backends:
            runners["torch"] = run_torch
            result["torch"]["deform_attn"] = ms_deform_attn_backend("cpu")
        for run in runners.values():
            _time(run, spec["warmup"], 0)
        times = {b: [] for b in runners}
        for _ in range(spec["iters"]):  # alternate, so that machine load hits both alike
            for b, run in runners.items():
                times[b].append(_timed(run))
        for b in runners:
            result[b].update(_stats(times[b]))
            result[b].update(_memory_in_subprocess(b, spec, path))
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or argv[0] != "memory":
        print(
            "usage: python -m petr.benchmark.backends memory torch|onnxruntime '<spec>' ONNX",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(measure_memory(argv[1], json.loads(argv[2]), argv[3])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
