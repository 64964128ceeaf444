#!/usr/bin/env python
"""Benchmark PETR end to end: inference latency/throughput or training iterations per second.

    python tools/benchmark.py --config-file configs/petr_R50.yaml                  # inference
    python tools/benchmark.py --config-file configs/petr_R50.yaml --train --batch-size 2
    python tools/benchmark.py --config-file configs/petr_R50.yaml --compile --compare keypoint_rcnn
    python tools/benchmark.py --config-file configs/petr_R50.yaml --precisions fp32 \
        --compile-shapes static dynamic --height 512 --width 768     # both compiled variants
    python tools/benchmark.py --config-file configs/petr_R50.yaml --compare joint_scores
    python tools/benchmark.py --config-file configs/petr_R50.yaml --devices cuda \
        --precisions fp32 bf16 --compile                                     # GPU check
    python tools/benchmark.py --config-file configs/petr_R50.yaml --devices cpu \
        --precisions fp32 bf16 --compile --compare keypoint_rcnn    # precisions (README)
    python tools/benchmark.py --config-file configs/petr_R50.yaml --backends torch onnxruntime \
        --threads 2                                    # eager PyTorch vs onnxruntime (README)

Each (device, precision) pair is measured in a fresh subprocess (petr.benchmark.measure) on
synthetic inputs of --height x --width pixels (training: random people), after --warmup untimed
iterations, over --iters timed ones. Weights are random unless MODEL.WEIGHTS is set (speed does
not depend on them, except through which proposals are selected). With --compile the compiled
model (torch.compile; --compile-shapes static and/or dynamic) and with --compare keypoint_rcnn
Detectron2's Keypoint R-CNN R50-FPN are timed in the same process, alternating with the eager
model, so the ratios see the same load.
Prints a markdown table, and with --stages the eager time of each stage.
--backends times the same fp32 CPU inference in eager PyTorch and in onnxruntime (the dynamic
ONNX export), alternating in one process, and measures each runtime's peak memory in a process
of its own (petr.benchmark.backends).
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
increase of the process's peak RSS (VmHWM) over its value once the model was built, i.e.
the activations, gradients and optimiser state of the measured iterations.
Precisions are autocast over an fp32 model; fp16 only on CUDA. Inference in fp16/bf16 is the
model's own TEST.AMP (as --eval-only and the demo run it), timed alternating with an fp32 copy
of the model in the same process: "x fp32" = fp32 eager ms / this row's eager (or compiled) ms.
compiled static / dynamic: torch.compile(model, mode=--compile-mode, dynamic=False / True) on the
same weights (--compile-shapes); "compile s" is its first call (compilation included: static
compiles again for every input size, dynamic once for all sizes); "x eager" = eager ms /
compiled ms. Keypoint R-CNN:
model-zoo COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml, random weights, score threshold 0 so
that its keypoint head runs on --kpt-boxes person boxes per image; "PETR / KRCNN" = PETR ms /
Keypoint R-CNN ms (<= 1: PETR is as fast or faster). Stages: mean eager ms inside each part's
forward (hooks; CUDA synchronises at each boundary); "rest" is preprocessing, heads outside the
parts, postprocessing (training: also the heatmap branch, matching, losses and the update).
--compare joint_scores: the same model and weights with MODEL.PETR.JOINT_SCORES none, alternating;
"x none" = ms with the configured joint scores / ms without (the heatmap branch's cost).
Peak memory covers every model timed in the process.
--backends: ms/img of each runtime on one (1, 3, H, W) input with its image_sizes (the exported
graph's interface; no host resize), alternating in one process; "x torch" = PyTorch ms / this
runtime's ms. Peak RSS: VmHWM of a separate process that runs only that runtime (onnxruntime:
numpy + onnxruntime, no torch); "mem x torch" = its peak / PyTorch's. "export s": the ONNX export.
"""

STAGE_LABELS = ("backbone", "neck", "encoder", "proposals", "pose decoder", "joint decoder")


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
        "--compile",
        action="store_true",
        help="also time the torch.compile'd model (implied by MODEL.PETR.COMPILE.ENABLED)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode (default: MODEL.PETR.COMPILE.MODE)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="torch.compile backend (aot_eager/eager: check tracing without code generation)",
    )
    parser.add_argument(
        "--compile-shapes",
        nargs="+",
        default=None,
        choices=["static", "dynamic"],
        help="compiled variants to time, each in its own columns: torch.compile dynamic=False "
        "(a graph per input size) and/or dynamic=True (one graph for every size) "
        "(default: MODEL.PETR.COMPILE.DYNAMIC's)",
    )
    parser.add_argument(
        "--stages", action="store_true", help="also print the eager time of each model stage"
    )
    parser.add_argument(
        "--compare",
        choices=["keypoint_rcnn", "joint_scores"],
        default=None,
        help="also time Detectron2's Keypoint R-CNN R50-FPN (random weights), or the same model "
        "with MODEL.PETR.JOINT_SCORES none (joint_scores); inference only",
    )
    parser.add_argument(
        "--kpt-boxes",
        type=int,
        default=20,
        help="person boxes per image for Keypoint R-CNN's keypoint head (default 20)",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        choices=["torch", "onnxruntime"],
        help="time fp32 CPU inference in these runtimes instead (eager PyTorch and the dynamic "
        "ONNX export in onnxruntime), latency alternating in one process, memory each in its own",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of each runtime with --backends (default: torch's default)",
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
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        compile_shapes=args.compile_shapes,
        compare=args.compare,
        kpt_boxes=args.kpt_boxes,
        stages=args.stages,
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


def _ms(r) -> str:
    return f"{r['ms_per_iter']:.1f} ({r['ms_per_iter_min']:.1f})"


def format_table(args, rows) -> str:
    mode = "train" if args.train else "inference"
    header = (
        "| mode | device | precision | batch | size | ms/iter (min) | it/s | ms/img | img/s "
        "| peak mem MiB | deform attn |"
    )
    shapes = args.compile_shapes or []
    for shape in shapes:
        header += f" compiled {shape} ms/iter (min) | compile s | x eager |"
    if args.compare == "joint_scores":
        header += " JOINT_SCORES none ms/iter (min) | x none |"
    elif args.compare:
        header += " Keypoint R-CNN ms/iter (min) | boxes | PETR / KRCNN |"
        if shapes:
            header += f" compiled {shapes[0]} / KRCNN |"
    vs_fp32 = not args.train and any(p != "fp32" for (_, p), _ in rows)
    if vs_fp32:
        header += " fp32 eager ms/iter (min) | eager x fp32 |"
        header += "".join(f" compiled {shape} x fp32 |" for shape in shapes)
    width = header.count("|") - 1
    lines = [header, "|" + "---|" * width]
    size = f"{args.height}x{args.width}"
    for (device, precision), r in rows:
        head = f"| {mode} | {device} | {precision} | {args.batch_size} | {size} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} |" + " |" * (width - 6))
            continue
        line = (
            f"{head} {_ms(r)} | {r['iters_per_s']:.3f} | {r['ms_per_iter'] / args.batch_size:.1f} "
            f"| {r['images_per_s']:.3f} | {r['peak_mem_mib']:.0f} | {r['deform_attn']} |"
        )
        for shape in shapes:
            c = r["compiled"][shape]
            line += (
                f" {_ms(c)} | {c['compile_s']:.1f} | {r['ms_per_iter'] / c['ms_per_iter']:.2f} |"
            )
        if args.compare == "joint_scores":
            n = r["joint_scores_none"]
            line += f" {_ms(n)} | {r['ms_per_iter'] / n['ms_per_iter']:.3f} |"
        elif args.compare:
            k = r["keypoint_rcnn"]
            line += f" {_ms(k)} | {k['boxes']:.0f} | {r['ms_per_iter'] / k['ms_per_iter']:.2f} |"
            if shapes:
                line += f" {r['compiled'][shapes[0]]['ms_per_iter'] / k['ms_per_iter']:.2f} |"
        if vs_fp32:
            base = r.get("eager_fp32", r)  # an fp32 row is its own baseline
            line += f" {_ms(base)} | {base['ms_per_iter'] / r['ms_per_iter']:.2f} |"
            for shape in shapes:
                line += f" {base['ms_per_iter'] / r['compiled'][shape]['ms_per_iter']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def format_stages(rows) -> str:
    """Mean eager ms per stage, one row per successful measurement."""
    lines = [
        "| device | precision | " + " | ".join(STAGE_LABELS) + " | rest |",
        "|" + "---|" * (len(STAGE_LABELS) + 3),
    ]
    for (device, precision), r in rows:
        if "error" in r:
            continue
        stages = [r["stages"][label] for label in STAGE_LABELS]
        rest = r["ms_per_iter"] - sum(stages)
        cells = " | ".join(f"{ms:.1f}" for ms in [*stages, rest])
        lines.append(f"| {device} | {precision} | {cells} |")
    return "\n".join(lines)


def format_backends(args, result) -> str:
    """The --backends table: one row per runtime, ratios against eager PyTorch."""
    lines = [
        "| runtime | size | threads | ms/img (min) | x torch | peak RSS MiB | mem x torch "
        "| export s | notes |",
        "|" + "---|" * 9,
    ]
    base = result.get("torch")
    for name, r in result.items():
        speed = f"{base['ms'] / r['ms']:.2f}" if base else "-"
        mem = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}" if base else "-"
        export = f"{r['export_s']:.1f}" if "export_s" in r else "-"
        note = (
            f"deform attn {r['deform_attn']}"
            if "deform_attn" in r
            else f"max score diff vs torch {r['max_score_diff']:.1e}"
        )
        lines.append(
            f"| {name} | {args.height}x{args.width} | {args.threads} | {r['ms']:.1f} "
            f"({r['ms_min']:.1f}) | {speed} | {r['peak_rss_mib']:.0f} | {mem} | {export} | {note} |"
        )
    return "\n".join(lines)


def main_backends(parser, args) -> int:
    if args.train or args.compare or args.compile or args.compile_shapes or args.stages:
        parser.error(
            "--backends times fp32 inference only: no --train/--compare/--compile/--stages"
        )
    if (args.devices or ["cpu"]) != ["cpu"] or (args.precisions or ["fp32"]) != ["fp32"]:
        parser.error("--backends runs on the CPU in fp32 (onnxruntime's CPU provider)")
    if args.batch_size != 1:
        parser.error("--backends times one image per iteration (--batch-size 1)")
    from petr.benchmark.backends import run_backends

    args.threads = args.threads or torch.get_num_threads()
    spec = dict(config_file=args.config_file, opts=args.opts, threads=args.threads)
    spec.update(height=args.height, width=args.width, warmup=args.warmup, iters=args.iters)
    result = run_backends(spec, list(dict.fromkeys(args.backends)))
    print(format_backends(args, result))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("need --iters >= 1, --warmup >= 0 and --batch-size >= 1")
    if args.backends:
        return main_backends(parser, args)
    if args.compare and args.train:
        parser.error(f"--compare {args.compare} times inference only; drop --train")
    if args.kpt_boxes < 1:
        parser.error(f"--kpt-boxes must be >= 1, got {args.kpt_boxes}")
    if args.height < 32 or args.width < 32:
        parser.error(f"--height/--width must be >= 32, got {args.height}x{args.width}")
    from petr import get_petr_cfg

    # MODEL.PETR.COMPILE.ENABLED in the config (or --opts) asks for the compiled column too
    compile_cfg = get_petr_cfg(args.config_file, args.opts).MODEL.PETR.COMPILE
    args.compile = args.compile or compile_cfg.ENABLED or bool(args.compile_shapes)
    if args.compile:
        shapes = args.compile_shapes or ["dynamic" if compile_cfg.DYNAMIC else "static"]
        args.compile_shapes = list(dict.fromkeys(shapes))
    pairs, notes = plan(args)
    if not pairs:
        parser.error("nothing to measure: " + "; ".join(notes))
    rows = [((d, p), measure(args, d, p)) for d, p in pairs]
    print(format_table(args, rows))
    if args.stages and any("error" not in r for _, r in rows):
        print("\nEager time per stage, ms (mean over the timed iterations):\n")
        print(format_stages(rows))
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
