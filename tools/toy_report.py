#!/usr/bin/env python
"""Summarise a training run: the learning curve (loss and keypoint AP per evaluation) as a table
and a PNG, and drawings of the final predictions on a few validation images.

    python tools/toy_report.py output/petr_toy [--num-vis 6]
Reads OUTPUT_DIR/metrics.json (Detectron2's JSONWriter), the untrained model's AP from
OUTPUT_DIR/untrained/log.txt when present, and the predictions COCOEvaluator saved in
OUTPUT_DIR/inference/instances_predictions.pth.
"""

import argparse
import json
import math
import os

import cv2
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer

from petr import get_petr_cfg


def read_curve(metrics_file, max_iter):
    """Rows (iterations done, mean total_loss since the previous row, keypoints AP)."""
    rows, losses = [], []
    with open(metrics_file) as f:
        for line in f:
            m = json.loads(line)
            if "total_loss" in m:
                losses.append(m["total_loss"])
            if "keypoints/AP" in m:
                loss = sum(losses) / len(losses) if losses else float("nan")
                # periodic evaluations log the 0-based iteration, the final one MAX_ITER
                rows.append((min(m["iteration"] + 1, max_iter), loss, m["keypoints/AP"]))
                losses = []
    return rows


def read_logged_ap(log_file):
    """Keypoint AP of the last evaluation in a Detectron2 log (its `copypaste:` lines), or None."""
    ap, header = None, None
    with open(log_file) as f:
        for line in f:
            if "copypaste: " not in line:
                continue
            fields = line.split("copypaste: ", 1)[1].strip().split(",")
            if fields[0] == "AP":
                header = fields
            elif header is not None and len(fields) == len(header):
                ap, header = float(fields[0]), None
    return ap


def plot_curve(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(it, [r[2] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("keypoint AP (petr_toy_val)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(it, [r[1] for r in rows], "s--", color="tab:red")
    ax2.set_ylabel("training loss", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def draw_predictions(cfg, output_dir, num, threshold):
    dataset = cfg.DATASETS.TEST[0]
    preds = torch.load(os.path.join(output_dir, "inference", "instances_predictions.pth"))
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(dataset)}
    meta = MetadataCatalog.get(dataset)
    vis_dir = os.path.join(output_dir, "vis")
    os.makedirs(vis_dir, exist_ok=True)
    written = []
    for p in preds[:num]:
        d = dicts[p["image_id"]]
        img = read_image(d["file_name"], format="RGB")
        v = Visualizer(img, meta)
        for inst in p.get("instances", []):
            if inst["score"] < threshold:
                continue
            kpts = torch.tensor(inst["keypoints"]).view(-1, 3)
            kpts[:, :2] += 0.5  # the json is in COCO pixel indices; the drawing in continuous xy
            v.draw_and_connect_keypoints(kpts)
        out = os.path.join(vis_dir, os.path.basename(d["file_name"]))
        cv2.imwrite(out, v.output.get_image()[:, :, ::-1])
        written.append(out)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--config-file", default="configs/petr_toy.yaml")
    parser.add_argument("--num-vis", type=int, default=6)
    parser.add_argument("--confidence-threshold", type=float, default=0.2)
    args = parser.parse_args()
    cfg = get_petr_cfg(args.config_file)

    rows = read_curve(os.path.join(args.output_dir, "metrics.json"), cfg.SOLVER.MAX_ITER)
    untrained = os.path.join(args.output_dir, "untrained", "log.txt")  # `make toy` writes it
    untrained_ap = read_logged_ap(untrained) if os.path.isfile(untrained) else None
    if untrained_ap is not None:
        rows.insert(0, (0, float("nan"), untrained_ap))
    print("| iteration | mean training loss | keypoint AP |")
    print("|---:|---:|---:|")
    for it, loss, ap in rows:
        loss_text = "" if math.isnan(loss) else f"{loss:.2f}"
        print(f"| {it} | {loss_text} | {ap:.1f} |")
    if rows:
        plot_curve(rows, os.path.join(args.output_dir, "learning_curve.png"))
        print(f"learning curve: {os.path.join(args.output_dir, 'learning_curve.png')}")
    files = draw_predictions(cfg, args.output_dir, args.num_vis, args.confidence_threshold)
    print(f"{len(files)} drawings of validation predictions in {os.path.dirname(files[0])}")


if __name__ == "__main__":
    main()
