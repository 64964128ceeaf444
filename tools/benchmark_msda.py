"""Benchmark the multi-scale deformable attention kernels against the pure-PyTorch reference.

Three PETR cases (4 levels, 8 heads x 32 channels):
  encoder        one 800x1216 image, strides 8-64 (100x152 ... 13x19), every token a query, 4 points
  pose_decoder   300 queries x 17 points per level
  joint_decoder  100 poses (the batch) x 17 joints x 4 points, every pose on the same memory

Times are medians over --repeat runs, measured in this process with the backends alternating;
"x ref" is the reference time divided by the backend's. Peak memory is the extra memory one call
needs on top of its inputs: on CPU the rise of the peak RSS in a fresh subprocess, on CUDA
torch.cuda.max_memory_allocated.

    python tools/benchmark_msda.py --device cpu --dtype float32 --repeat 5
"""

import argparse
import importlib
import json
import math
import statistics
import subprocess
import sys
import time

import torch

msda = importlib.import_module("petr.layers.ms_deform_attn")
peak_rss_mib = importlib.import_module("petr.benchmark.rss").peak_rss_mib

LEVELS = [(100, 152), (50, 76), (25, 38), (13, 19)]
HEADS, CHANNELS = 8, 32
CASES = ("encoder", "pose_decoder", "joint_decoder")
BACKENDS = {"reference": msda.ms_deform_attn_reference, "kernel": msda.ms_deform_attn}


def _head_directions(M):
    """(M, 2) unit (x, y) directions, the Deformable DETR initial sampling pattern."""
    angle = torch.arange(M, dtype=torch.float64) * (2 * math.pi / M)
    return torch.stack([angle.cos(), angle.sin()], -1)


def make_inputs(case, device, dtype, seed=0):
    """Realistic inputs: sampling points cluster around each query's reference point."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L, M, D = int(areas.sum()), len(LEVELS), HEADS, CHANNELS
    wh = shapes.flip(-1).double()  # (L, 2) level sizes as (W, H)
    if case == "encoder":
        N, P = 1, 4
        # reference point = each token's own pixel centre, normalised: (Q, 2)
        ref = torch.cat(
            [
                torch.stack(
                    torch.meshgrid(
                        (torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"
                    ),
                    -1,
                ).reshape(-1, 2)
                for h, w in LEVELS
            ]
        ).double()
        ref = ref[None, :, None, None, None, :]  # (1, Q, 1, 1, 1, 2)
        steps = torch.arange(1, P + 1, dtype=torch.float64)
        offset = _head_directions(M)[:, None, None, :] * steps[None, None, :, None]  # (M,1,P,2)
        offset = offset + torch.randn(N, S, M, L, P, 2, generator=g, dtype=torch.float64)
        loc = ref + offset / wh[None, None, None, :, None, :]
    elif case == "pose_decoder":
        N, Q, P = 1, 300, 17
        centre = torch.rand(N, Q, 1, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
        kpts = centre + 0.05 * torch.randn(N, Q, P, 2, generator=g, dtype=torch.float64)
        noise = torch.randn(N, Q, M, L, P, 2, generator=g, dtype=torch.float64)
        loc = kpts[:, :, None, None] + noise / wh[None, None, None, :, None, :]
    elif case == "joint_decoder":
        N, Q, P = 100, 17, 4
        centre = torch.rand(N, 1, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
        joints = centre + 0.05 * torch.randn(N, Q, 2, generator=g, dtype=torch.float64)
        steps = torch.arange(1, P + 1, dtype=torch.float64)
        offset = _head_directions(M)[:, None, None, :] * steps[None, None, :, None]  # (M,1,P,2)
        loc = joints[:, :, None, None, None, :] + offset / wh[None, None, None, :, None, :]
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    Q = loc.shape[1]
    memory = torch.randn(1, S, M, D, generator=g)
    # Every joint-decoder instance reads its image's memory, gathered as in opera (a real copy).
    value = memory.expand(N, S, M, D).contiguous()
    logits = torch.randn(N, Q, M, L * P, generator=g)
    attn = logits.softmax(-1).view(N, Q, M, L, P)
    tensors = [value, loc, attn]
    value, loc, attn = (t.to(device=device, dtype=dtype).contiguous() for t in tensors)
    return value, shapes.to(device), start.to(device), loc, attn


def run_once(fn, inputs, backward):
    value, shapes, start, loc, attn = inputs
    out = fn(value, shapes, start, loc, attn)
    if backward:
        out.backward(torch.ones_like(out))
        for t in (value, loc, attn):
            t.grad = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backends(names, inputs, backward, repeat, device):
    """Median seconds per call of each backend; runs alternate so load changes hit all alike."""
    if backward:
        for t in (inputs[0], inputs[3], inputs[4]):
            t.requires_grad_(True)
    times = {name: [] for name in names}
    for name in names:
        run_once(BACKENDS[name], inputs, backward)  # warm-up
    for _ in range(repeat):
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            run_once(BACKENDS[name], inputs, backward)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    for t in (inputs[0], inputs[3], inputs[4]):
        t.requires_grad_(False)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_mib(case, backend, backward, device, dtype):
    """Extra peak memory (MiB) of one call, beyond its inputs."""
    if device.type == "cuda":
        inputs = make_inputs(case, device, dtype)
        run_once(BACKENDS[backend], inputs, False)  # load kernels outside the measurement
        if backward:
            for t in (inputs[0], inputs[3], inputs[4]):
                t.requires_grad_(True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_once(BACKENDS[backend], inputs, backward)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # CPU: a fresh process, so earlier allocations and freed-but-cached pages do not count.
    cmd = [sys.executable, __file__, "--_measure", case, backend, str(int(backward)), str(dtype)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def _measure_cpu_child(case, backend, backward, dtype_name):
    dtype = getattr(torch, dtype_name.replace("torch.", ""))
    inputs = make_inputs(case, torch.device("cpu"), dtype)
    if backward:
        for t in (inputs[0], inputs[3], inputs[4]):
            t.requires_grad_(True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
    base = peak_rss_mib()  # the current RSS, just after the reset
    run_once(BACKENDS[backend], inputs, backward)
    peak = peak_rss_mib()
    print(json.dumps({"peak_mib": peak - base}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    parser.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        case, backend, backward, dtype_name = args._measure
        _measure_cpu_child(case, backend, backward == "1", dtype_name)
        return

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    why = msda._missing_backend(device.type)
    print(f"device={device} dtype={args.dtype} torch={torch.__version__} threads=", end="")
    print(f"{torch.get_num_threads()} repeat={args.repeat}")
    if why is not None:
        print(f"no compiled kernel ({why}): only the reference is measured")
    elif device.type == "cpu" and not msda._C.cpu_kernel_is_parallel():
        print("note: petr._C was compiled without OpenMP, its CPU kernel runs on one thread")
    backends = ["reference"] + (["kernel"] if why is None else [])
    print(
        "| case | backend | fwd ms | fwd x ref | fwd+bwd ms | fwd+bwd x ref "
        "| fwd peak MiB | fwd+bwd peak MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        inputs = make_inputs(case, device, dtype)
        fwd = time_backends(backends, inputs, False, args.repeat, device)
        fwd_bwd = time_backends(backends, inputs, True, args.repeat, device)
        for name in backends:
            mem = ["-", "-"]
            if not args.no_memory:
                mem = [f"{peak_memory_mib(case, name, b, device, dtype):.1f}" for b in (0, 1)]
            print(
                f"| {case} | {name} | {fwd[name] * 1e3:.1f} | {fwd['reference'] / fwd[name]:.1f} "
                f"| {fwd_bwd[name] * 1e3:.1f} | {fwd_bwd['reference'] / fwd_bwd[name]:.1f} "
                f"| {mem[0]} | {mem[1]} |",
                flush=True,
            )
        del inputs


if __name__ == "__main__":
    main()
