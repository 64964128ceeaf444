#!/usr/bin/env python
"""CPU time of PETR inference with MODEL.PETR.JOINT_SCORES heatmap over none, the same model
alternating in one process, on one thread: robust to a loaded machine, unlike wall time.

    python tools/joint_scores_cpu_time.py --config-file configs/petr_R50.yaml \
        --height 800 --width 1333 --iters 2
"""

import argparse
import sys
import time

import torch
from detectron2.modeling import build_model

from petr import get_petr_cfg
from petr.benchmark.measure import synthetic_batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--iters", type=int, default=3, help="timed passes per mode")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = get_petr_cfg(args.config_file, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = synthetic_batch(model.num_keypoints, args.height, args.width, 1, False)
    times = {"heatmap": [], "none": []}
    with torch.no_grad():
        for i in range(args.iters + 1):  # the first pass of each mode is a warm-up
            for mode, kept in times.items():
                model.joint_scores = mode
                start = time.process_time()
                model(batch)
                if i:
                    kept.append(time.process_time() - start)
    mean = {mode: sum(t) / len(t) for mode, t in times.items()}
    print(f"{args.config_file} {args.height}x{args.width}: CPU s per image "
          f"heatmap {mean['heatmap']:.3f}, none {mean['none']:.3f}; "
          f"heatmap / none = {mean['heatmap'] / mean['none']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
