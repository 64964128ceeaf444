#!/usr/bin/env python
"""Convert an official Microsoft Swin ImageNet checkpoint into PETR backbone weights.

    python tools/convert_swin_pretrained.py swin_large_patch4_window7_224_22kto1k.pth \
        swin_large_22kto1k_petr.pth

The output `{"model": {"backbone.*": ...}, "__author__": "petr"}` is loaded by Detectron2's
`MODEL.WEIGHTS` into a PETR model whose backbone is `build_swin_backbone`. The classifier and the
final norm are dropped; the per-output LayerNorms `backbone.norm{s}` do not exist in an ImageNet
checkpoint, so Detectron2 reports them (and the rest of PETR) as missing, which is expected.
"""

import argparse
import collections
import re
import sys

import torch

from petr.checkpoint.opera_converter import OperaCheckpointError, read_checkpoint
from petr.checkpoint.swin_keys import convert_microsoft_swin, swin_arch_from_state_dict


def _summarise(keys):
    """Count keys per pattern, numbers replaced by '*' (e.g. 'layers.*.blocks.*.attn_mask')."""
    counts = collections.Counter(re.sub(r"\.\d+", ".*", k) for k in keys)
    return ", ".join(f"{k} ({n})" for k, n in sorted(counts.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official Swin checkpoint (.pth, {'model': state_dict})")
    parser.add_argument("dst", help="output .pth for MODEL.WEIGHTS")
    args = parser.parse_args(argv)

    try:
        # Runs no code from the file; objects other than tensors and plain data (none in the
        # official release) load as inert placeholders.
        ckpt = read_checkpoint(args.src)
    except OperaCheckpointError as e:  # missing or not a PyTorch checkpoint, naming the file
        sys.exit(str(e))
    if not isinstance(ckpt, dict):
        sys.exit(f"{args.src}: expected a dict checkpoint, got {type(ckpt).__name__}")
    try:
        sd, dropped = convert_microsoft_swin(ckpt)
    except ValueError as e:
        sys.exit(f"{args.src}: {e}")

    arch = swin_arch_from_state_dict(sd)
    torch.save(
        {"model": {f"backbone.{k}": v for k, v in sd.items()}, "__author__": "petr"}, args.dst
    )
    print(f"Wrote {len(sd)} backbone tensors to {args.dst}")
    print(
        "Architecture (must match MODEL.SWIN): "
        f"EMBED_DIM {arch['embed_dim']}, DEPTHS {arch['depths']}, NUM_HEADS {arch['num_heads']}, "
        f"WINDOW_SIZE {arch['window_size']}, PATCH_SIZE {arch['patch_size']}, "
        f"MLP_RATIO {arch['mlp_ratio']}, QKV_BIAS {arch['qkv_bias']}, "
        f"PATCH_NORM {arch['patch_norm']}"
    )
    print(f"Dropped {len(dropped)} tensors: {_summarise(dropped) or 'none'}")
    print(
        "Expected as missing when loading: backbone.norm{s}.* (one output LayerNorm per returned "
        "stage, e.g. norm1..norm3 for res3..res5; ImageNet training has none, they start as "
        "identity) and everything outside the backbone."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
