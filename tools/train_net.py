#!/usr/bin/env python
"""Train and evaluate PETR, as Detectron2's tools/train_net.py does.

    python tools/train_net.py --config-file configs/petr_R50.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/petr_R50.yaml --eval-only MODEL.WEIGHTS m.pth
    python tools/train_net.py --config-file configs/petr_toy.yaml --resume
MODEL.WEIGHTS may also be a raw official checkpoint (hikvision-research/opera): it is converted in
memory (see petr.checkpoint.checkpointer).
Runs on CPU machines too (MODEL.DEVICE cpu; --num-gpus N then starts N gloo processes).
Your own COCO-format keypoint data, no Python needed (K, flip map, skeleton from the json):
    python tools/train_net.py --config-file configs/petr_R50.yaml \
        --dataset my_train train.json images/ --dataset my_val val.json images/ \
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"
"""

import os

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from petr import get_petr_cfg
from petr.checkpoint.checkpointer import PETRCheckpointer
from petr.data.datasets.coco_json import parse_flip_map, register_coco_keypoint_json
from petr.engine import PETRTrainer


def setup(args):
    cfg = get_petr_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # PETR's own messages (e.g. the toy dataset being generated on first use) go to the same log
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="petr")
    return cfg


def get_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format keypoint json as dataset NAME (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--oks-sigmas", metavar="S1,...,SK",
        help="--dataset: the K OKS sigmas (default: COCO's / CrowdPose's for their joints)",
    )  # fmt: skip
    parser.add_argument(
        "--flip-map", metavar="LEFT:RIGHT,...",
        help="--dataset: keypoint pairs a flip swaps (default: left/right names in the json)",
    )  # fmt: skip
    return parser


def register_datasets(args):
    """--dataset registrations; in main, so that every launched process has them."""
    flip_map = parse_flip_map(args.flip_map.split(",")) if args.flip_map else None
    sigmas = [float(s) for s in args.oks_sigmas.split(",")] if args.oks_sigmas else None
    for name, json_file, image_root in args.dataset:
        register_coco_keypoint_json(
            name, json_file, image_root, oks_sigmas=sigmas, flip_map=flip_map
        )


def main(args):
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = PETRTrainer.build_model(cfg)
        checkpointer = PETRCheckpointer.from_config(
            cfg, model, cfg.OUTPUT_DIR, config_file=args.config_file
        )
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = PETRTrainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(PETRTrainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = PETRTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_gpus)))
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
