#!/usr/bin/env python
"""Convert torchvision ImageNet ResNet weights for MODEL.WEIGHTS of the R50/R101 configs.

    python tools/convert_torchvision_resnet.py resnet50-0676ba61.pth R-50-torchvision.pth
    python tools/train_net.py --config-file configs/petr_R50.yaml \\
        MODEL.WEIGHTS R-50-torchvision.pth
Only the backbone is in the file: Detectron2 reports the PETR head as not found in the
checkpoint, which is expected (it is initialised as the official code does).
"""

import argparse
import sys

import torch

from petr.checkpoint.opera_converter import OperaCheckpointError, read_checkpoint
from petr.checkpoint.torchvision_resnet import convert_torchvision_resnet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="torchvision state dict (.pth)")
    parser.add_argument("dst", help="output .pth for MODEL.WEIGHTS")
    args = parser.parse_args(argv)
    try:
        sd = read_checkpoint(args.src)  # runs no code from the file
    except OperaCheckpointError as e:  # missing or not a PyTorch checkpoint, naming the file
        print(f"error: {e}", file=sys.stderr)
        return 1
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    try:
        out, dropped = convert_torchvision_resnet(sd)
    except ValueError as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 1
    torch.save({"model": out, "__author__": "torchvision", "matching_heuristics": False}, args.dst)
    print(f"wrote {len(out)} backbone tensors to {args.dst}; dropped {len(dropped)} "
          f"(classifier and BN batch counters)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
