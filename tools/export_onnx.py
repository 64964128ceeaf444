#!/usr/bin/env python
"""Export PETR inference to ONNX: one graph for every image size and batch size.

    python tools/export_onnx.py --config-file configs/petr_R50.yaml --output petr_R50.onnx \
        --height 800 --width 1333 --verify --opts MODEL.WEIGHTS model_final.pth

Inputs: "image" (B, 3, H, W) float32 in INPUT.FORMAT channel order (raw 0-255 values, or
(x - PIXEL_MEAN) / PIXEL_STD with --normalized-input), padded bottom/right, and "image_sizes"
(B, 2) int64, the unpadded (h, w) of each image. Outputs, per image, sorted by descending score:
"scores" (B, N), "keypoints" (B, N, K, 3) (x, y, 1) and "boxes" (B, N, 4) xyxy, both in pixels
of that image's unpadded input; N = min(TEST.DETECTIONS_PER_IMAGE, NUM_QUERIES).
"""

import argparse
import sys

import torch
from detectron2.modeling import build_model

from petr import get_petr_cfg
from petr.checkpoint.checkpointer import PETRCheckpointer
from petr.export.onnx_wrapper import (
    DEFAULT_OPSET,
    DYNAMIC_EXPORT,
    MIN_OPSET,
    MIN_SIDE,
    compare_predictions,
    export_petr_onnx,
    run_onnxruntime,
    run_reference,
)
from petr.export.quantize import quantize_int8

EPILOG = f"""\
Limits:
  * torch >= 2.6 (the default stack): torch.export-based exporter, dynamic batch (1 to
    --max-batch) and dynamic H, W (--min-size to --max-size, at least {MIN_SIDE}); --height and
    --width only choose the traced example. Resize with the test resize (petr.export's
    PETRONNXPredictor does) and pad a batch bottom/right; the padding mask is built in-graph from
    image_sizes, so padding is never seen as image content.
  * torch < 2.6 (the floor stack, torch 2.3): the TorchScript tracer freezes the batch (1) and
    H x W at --height x --width; onnxruntime rejects other shapes (PETRONNXPredictor pads
    each image to that size; the in-graph mask from image_sizes keeps the padding out).
  * Deformable attention is exported through the pure-PyTorch reference (one GridSample per
    level), never the compiled petr._C kernel; GridSample needs opset >= {MIN_OPSET}.
  * MODEL.PETR.OKS_NMS_THRESH_TEST > 0: OKS-NMS runs in-graph with fixed shapes; suppressed
    poses keep their row with score 0.
  * fp32 only. The dynamic export of R50 takes minutes of CPU; the .onnx file holds the
    weights (~170 MB for R50).
"""


def setup_cfg(args):
    cfg = get_petr_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", default="model.onnx", help="path of the .onnx file to write")
    parser.add_argument("--height", type=int, default=800, help="export (example) height")
    parser.add_argument("--width", type=int, default=1333, help="export (example) width")
    parser.add_argument("--min-size", type=int, default=MIN_SIDE, help="smallest H and W")
    parser.add_argument("--max-size", type=int, default=2048, help="largest H and W")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch size")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})"
    )
    parser.add_argument(
        "--normalized-input",
        action="store_true",
        help="the graph takes (x - PIXEL_MEAN) / PIXEL_STD instead of raw 0-255 values",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare onnxruntime with PyTorch at 3 other sizes and on a padded batch of 2",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --verify image")
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="also write OUTPUT with suffix _int8: dynamic int8 weights (petr.export.quantize)",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth (must be last)",
    )
    return parser


def verify_cases(args):
    """(h, w) lists to verify: 3 single images of sizes other than the export size and a padded
    batch of 2 images of different sizes (dynamic export), or the one fixed size (the floor
    stack's traced graph)."""
    h, w = args.height, args.width
    if not DYNAMIC_EXPORT:
        return [[(h, w)]]
    lo, hi = max(args.min_size, MIN_SIDE), args.max_size

    def fit(a, b):
        return (min(max(int(a), lo), hi), min(max(int(b), lo), hi))

    others = [fit(h * 0.75, w), fit(h, w * 0.8), fit(h * 1.25 + 3, w * 1.1 + 5)]
    return [[s] for s in others] + [[fit(h * 1.1, w * 0.9), fit(h * 0.8, w * 1.05)]]


def verify(cfg, wrapper, path, args) -> list:
    """[(sizes, max differences)] between onnxruntime and PyTorch on random padded batches."""
    g = torch.Generator().manual_seed(args.seed)
    results = []
    for sizes in verify_cases(args):
        H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
        image = torch.zeros(len(sizes), 3, H, W)
        for i, (h, w) in enumerate(sizes):
            image[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g).float()
        if args.normalized_input:
            mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
            image = (image - mean) / torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
        image_sizes = torch.tensor(sizes, dtype=torch.int64)
        ref = run_reference(wrapper, image, image_sizes)
        results.append((sizes, compare_predictions(ref, run_onnxruntime(path, image, image_sizes))))
    return results


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opset < MIN_OPSET:
        parser.error(
            f"--opset {args.opset}: GridSample (deformable attention) needs >= {MIN_OPSET}"
        )
    if args.height <= 0 or args.width <= 0:
        parser.error(f"--height/--width must be positive, got {args.height}x{args.width}")
    if args.max_batch < 1 or args.max_size < args.min_size:
        parser.error("need --max-batch >= 1 and --max-size >= --min-size")
    cfg = setup_cfg(args)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        PETRCheckpointer.from_config(cfg, model, config_file=args.config_file).load(
            cfg.MODEL.WEIGHTS
        )
    else:
        print("MODEL.WEIGHTS is empty: exporting randomly initialised weights", file=sys.stderr)
    try:
        wrapper = export_petr_onnx(
            model,
            args.output,
            args.height,
            args.width,
            opset=args.opset,
            normalized_input=args.normalized_input,
            min_size=args.min_size,
            max_size=args.max_size,
            max_batch=args.max_batch,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    values = "normalised" if args.normalized_input else "raw 0-255"
    if DYNAMIC_EXPORT:
        lo = max(args.min_size, MIN_SIDE)
        shape = f"(1-{args.max_batch}, 3, {lo}-{args.max_size}, {lo}-{args.max_size})"
    else:
        shape = f"(2, 3, {args.height}, {args.width}), fixed (torch {torch.__version__})"
    print(f"Wrote {args.output}: input image {shape} float32, {values}, opset {args.opset}")
    if args.verify:
        for sizes, d in verify(cfg, wrapper, args.output, args):
            print(
                f"verify {sizes} (onnxruntime vs PyTorch): max |diff| scores {d['scores']:.3g}, "
                f"keypoints {d['keypoints']:.3g} px, boxes {d['boxes']:.3g} px "
                f"({d['compared']} poses with untied scores compared)"
            )
    if args.quantize:
        path = args.output.removesuffix(".onnx") + "_int8.onnx"
        q = quantize_int8(args.output, path)
        print(f"Wrote {path}: {q['quantized']} nodes int8, {len(q['kept_fp32'])} kept fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
