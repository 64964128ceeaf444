#!/usr/bin/env python
"""How well a model's per-joint confidences (pred_keypoints[..., 2]) separate labelled from
unlabelled (out of frame) joints and visible from hidden ones, as ROC AUCs.

    python tools/joint_confidence_auc.py --config-file configs/petr_toy.yaml \
        --opts MODEL.WEIGHTS /path/to/model_final.pth
    python tools/joint_confidence_auc.py --config-file configs/petr_R50.yaml \
        --dataset keypoints_coco_2017_val --opts MODEL.WEIGHTS petr_r50.pth

Predictions (the model's one inference path, MODEL.PETR.JOINT_SCORES as configured) are matched
to the ground-truth people of the dataset by OKS (COCOeval's greedy matching, --oks-threshold);
every joint of a matched pair contributes its confidence and its ground-truth visibility v.
Prints the AUCs of v>0 vs v=0, v=2 vs v<2 and, among labelled joints, v=2 vs v=1, with the
joint counts and mean confidences per v.
"""

import argparse
import json

from detectron2.utils.logger import setup_logger

from petr import get_petr_cfg
from petr.checkpoint.checkpointer import PETRCheckpointer
from petr.engine import PETRTrainer
from petr.evaluation.joint_confidence import JointConfidenceEvaluator


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", help="a registered keypoint dataset (default: DATASETS.TEST)")
    parser.add_argument("--oks-threshold", type=float, default=0.5, help="OKS to match a person")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs"
    )
    return parser


def joint_confidence_auc(cfg, dataset, oks_threshold=0.5, config_file=None):
    """The evaluator's report (a dict) for the model of `cfg` (weights: MODEL.WEIGHTS)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (dataset,)
    model = PETRTrainer.build_model(cfg)
    PETRCheckpointer.from_config(cfg, model, config_file=config_file).load(cfg.MODEL.WEIGHTS)
    evaluator = JointConfidenceEvaluator(dataset, oks_threshold)
    return PETRTrainer.test(cfg, model, [evaluator]).get("joint_confidence", {})


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="petr")
    cfg = get_petr_cfg(args.config_file, args.opts)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    report = joint_confidence_auc(cfg, dataset, args.oks_threshold, args.config_file)
    if not report:
        print("No prediction matched a ground-truth person: nothing to report")
        return 1
    print(f"Joint confidences on {dataset} (MODEL.PETR.JOINT_SCORES {cfg.MODEL.PETR.JOINT_SCORES})")
    for key, value in report.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
