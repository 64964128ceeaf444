#!/usr/bin/env python
"""Benchmark PETR end to end: inference latency/throughput or training iterations per second.

    python tools/benchmark.py --config-file configs/petr_R50.yaml                  # inference
    python tools/benchmark.py --config-file configs/petr_R50.yaml --train --batch-size 2

Each (device, precision) pair is measured in a fresh subprocess (petr.benchmark.measure) on
synthetic inputs of --height x --width pixels (training: random people), after --warmup untimed
iterations, over --iters timed ones. Weights are random unless MODEL.WEIGHTS is set (speed does
not depend on them, except through which proposals are selected). Prints a markdown table.
"""

import argparse
import json
import subprocess
import sys

import torch

PAPER_MS_V100 = {"R50": 89, "R101": 95, "Swin-L": 133}  # PETR paper, Table 2, batch 1, V100

EPILOG = """\
Columns: ms/iter is the mean over the timed iterations (min in brackets); ms/img = ms/iter /
batch. Peak memory: on CUDA torch.cuda.max_memory_allocated (weights included); on CPU the
increase of the process's peak RSS (ru_maxrss) over its value once the model was built, i.e.
the activations, gradients and optimiser state of the measured iterations.
Precisions are autocast over an fp32 model; fp16 only on CUDA.
"""


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--batch-size", type=int, default=1, help="images per iteration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations")
    parser.add_argument("--train", action="store_true", help="time training iterations instead")
    parser.add_argument(
        "--devices", nargs="+", default=None, help="default: cpu, and cuda when available"
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="default: fp32 bf16 on CPU, fp32 fp16 bf16 on CUDA",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth (must be last)",
    )
    return parser


def plan(args):
    """The (device, precision) pairs to measure, and notes on requested pairs left out."""
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    pairs, notes = [], []
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            notes.append(f"{device}: no CUDA device here, skipped")
            continue
        default = ["fp32", "fp16", "bf16"] if device.startswith("cuda") else ["fp32", "bf16"]
        for precision in args.precisions or default:
            if precision == "fp16" and not device.startswith("cuda"):
                notes.append(f"{device}/fp16: fp16 autocast is benchmarked on CUDA only")
                continue
            pairs.append((device, precision))
    return pairs, notes


def measure(args, device, precision) -> dict:
    spec = dict(
        config_file=args.config_file,
        opts=args.opts,
        mode="train" if args.train else "inference",
        device=device,
        precision=precision,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        warmup=args.warmup,
        iters=args.iters,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "petr.benchmark.measure", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {"error": err[-1]}
    return json.loads(lines[-1])


def paper_note(config_file: str, opts) -> str:
    """The paper's V100 latency for the backbone of this config, if the paper reports one."""
    from petr import get_petr_cfg

    cfg = get_petr_cfg(config_file, opts)
    if cfg.MODEL.BACKBONE.NAME == "build_swin_backbone":
        name = "Swin-L" if cfg.MODEL.SWIN.EMBED_DIM == 192 else None
    else:
        name = {50: "R50", 101: "R101"}.get(cfg.MODEL.RESNETS.DEPTH)
    if name is None or cfg.MODEL.PETR.HIDDEN_DIM != 256:
        return ""
    return (
        f"paper: {PAPER_MS_V100[name]} ms on V100 for {name} (PETR Table 2, inference, "
        "short side 800, long side <= 1333)"
    )


def format_table(args, rows) -> str:
    mode = "train" if args.train else "inference"
    lines = [
        "| mode | device | precision | batch | size | ms/iter (min) | it/s | ms/img | img/s "
        "| peak mem MiB | deform attn |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    size = f"{args.height}x{args.width}"
    for (device, precision), r in rows:
        head = f"| {mode} | {device} | {precision} | {args.batch_size} | {size} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"{head} {r['ms_per_iter']:.1f} ({r['ms_per_iter_min']:.1f}) | "
            f"{r['iters_per_s']:.3f} | {r['ms_per_iter'] / args.batch_size:.1f} | "
            f"{r['images_per_s']:.3f} | {r['peak_mem_mib']:.0f} | {r['deform_attn']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("need --iters >= 1, --warmup >= 0 and --batch-size >= 1")
    if args.height < 32 or args.width < 32:
        parser.error(f"--height/--width must be >= 32, got {args.height}x{args.width}")
    pairs, notes = plan(args)
    if not pairs:
        parser.error("nothing to measure: " + "; ".join(notes))
    rows = [((d, p), measure(args, d, p)) for d, p in pairs]
    print(format_table(args, rows))
    threads = {r["threads"] for _, r in rows if "threads" in r}
    if threads:
        notes.append(f"CPU threads: {', '.join(map(str, sorted(threads)))}")
    note = paper_note(args.config_file, args.opts)
    if note:
        notes.append(note)
    for n in notes:
        print(f"- {n}")
    return 1 if any("error" in r for _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
