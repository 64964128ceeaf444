#!/usr/bin/env python
"""Export PETR inference to ONNX for one image of a fixed size.

    python tools/export_onnx.py --config-file configs/petr_R50.yaml --output petr_R50.onnx \
        --height 800 --width 1333 --verify --opts MODEL.WEIGHTS model_final.pth

The graph has one input, "image" (1, 3, H, W) float32 in INPUT.FORMAT channel order (raw 0-255
values, or (x - PIXEL_MEAN) / PIXEL_STD with --normalized-input), and three outputs sorted by
descending score: "scores" (N,), "keypoints" (N, K, 3) (x, y, 1) and "boxes" (N, 4) xyxy, both
in pixels of the input image; N = min(TEST.DETECTIONS_PER_IMAGE, NUM_QUERIES).
"""

import argparse
import sys

import torch
from detectron2.modeling import build_model

from petr import get_petr_cfg
from petr.checkpoint.checkpointer import PETRCheckpointer
from petr.export.onnx_wrapper import (
    MIN_OPSET,
    compare_predictions,
    export_petr_onnx,
    run_onnxruntime,
    run_reference,
)
from petr.export.quantize import quantize_int8

EPILOG = f"""\
Limits:
  * Fixed input size. H and W are frozen at export: feature-map sizes enter the model as Python
    ints (reference points, position encodings, per-level splits), so tracing records them as
    constants and onnxruntime rejects any other size. Resize or pad the image to HxW yourself
    (keep the aspect ratio and pad bottom/right to match the training-time layout; padding is
    then seen as image content, since the exported graph has no padding mask). Export once per
    size you need; dynamic sizes are not supported.
  * Batch size 1, no padding mask (a single unpadded image needs none).
  * Deformable attention is exported through the pure-PyTorch reference (GridSample), never the
    compiled petr._C kernel; GridSample needs opset >= {MIN_OPSET}. Other ops are standard
    (Conv, Gemm/MatMul, LayerNormalization, Softmax, TopK, GatherElements, CumSum, Sin/Cos...).
  * fp32 only. Exporting R50 at 800x1333 takes ~1.5 min of CPU and ~3.3 GB of RAM; the
    .onnx file holds the weights (~170 MB for R50).
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
    parser.add_argument("--height", type=int, default=800, help="fixed input height (pixels)")
    parser.add_argument("--width", type=int, default=1333, help="fixed input width (pixels)")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset (>= {MIN_OPSET})")
    parser.add_argument(
        "--normalized-input",
        action="store_true",
        help="the graph takes (x - PIXEL_MEAN) / PIXEL_STD instead of raw 0-255 values",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the exported graph in onnxruntime on a random image and compare with PyTorch",
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


def verify(cfg, wrapper, path, args) -> dict:
    """Max differences between onnxruntime and PyTorch on a random (1, 3, H, W) image."""
    g = torch.Generator().manual_seed(args.seed)
    image = torch.randint(0, 256, (1, 3, args.height, args.width), generator=g).float()
    if args.normalized_input:
        mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
        image = (image - mean) / torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    return compare_predictions(run_reference(wrapper, image), run_onnxruntime(path, image))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opset < MIN_OPSET:
        parser.error(
            f"--opset {args.opset}: GridSample (deformable attention) needs >= {MIN_OPSET}"
        )
    if args.height <= 0 or args.width <= 0:
        parser.error(f"--height/--width must be positive, got {args.height}x{args.width}")
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
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    values = "normalised" if args.normalized_input else "raw 0-255"
    shape = (1, 3, args.height, args.width)
    print(f"Wrote {args.output}: input image {shape} float32, {values}, opset {args.opset}")
    if args.verify:
        d = verify(cfg, wrapper, args.output, args)
        print(
            f"verify (onnxruntime vs PyTorch): max |diff| scores {d['scores']:.3g}, "
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
