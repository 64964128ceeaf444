#!/usr/bin/env python
"""Convert an official PETR checkpoint (hikvision-research/opera) for Detectron2's MODEL.WEIGHTS.

    python tools/convert_opera_checkpoint.py SRC.pth DST.pth
    python tools/convert_opera_checkpoint.py --dry-run SRC.pth     # print the inferred layout only

Handles the R50, R101 and Swin-L COCO and the Swin-L CrowdPose releases (and any variant of them
whose architecture the tensors reveal). Prints the inferred architecture, the shipped config that
matches it (or the config overrides that build it) and per-module tensor counts. Exits with
status 1 and a message naming the file, key or shapes at fault when the checkpoint cannot be
converted.
"""

import argparse
import sys

from petr.checkpoint.opera_converter import OperaCheckpointError, convert_opera_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official checkpoint (.pth) written by mmcv/mmdet")
    parser.add_argument("dst", nargs="?", help="output file for Detectron2 MODEL.WEIGHTS")
    parser.add_argument(
        "--dry-run", action="store_true", help="infer and print the layout; write nothing"
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not args.dst:
        parser.error("DST is required unless --dry-run is given")
    try:
        report = convert_opera_checkpoint(args.src, None if args.dry_run else args.dst)
    except OperaCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if not args.dry_run:
        print(f"Wrote {args.dst}; load it with MODEL.WEIGHTS {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
