"""`PETRTrainer`: Detectron2's DefaultTrainer with PETR's data, optimiser and evaluators.

Differences from DefaultTrainer:
- the official AdamW recipe (engine/solver.py);
- PETR's dataset mapper for training and testing;
- COCO / CrowdPose keypoint evaluators with the dataset's OKS sigmas;
- DistributedDataParallel without `device_ids` when the model is on CPU, so multi-process
  training also runs on CPU machines (gloo);
- AMP with a configurable precision, and a clear error when it is asked for without CUDA;
- torch.compile when MODEL.PETR.COMPILE.ENABLED (build_model).
"""

import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.dataset_mapper import PETRDatasetMapper
from ..evaluation import build_keypoint_evaluator
from ..modeling.compile import compile_model
from ..modeling.test_time_augmentation import PETRWithTTA
from .solver import build_petr_optimizer


def ddp_kwargs(model: torch.nn.Module) -> dict:
    """DDP arguments: Detectron2 passes device_ids=[local_rank], which DDP rejects on CPU."""
    kwargs = {"broadcast_buffers": False}
    if next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return kwargs


class PETRTrainer(DefaultTrainer):
    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, **ddp_kwargs(model))
        self._trainer = self.build_step_runner(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @staticmethod
    def build_step_runner(cfg, model, data_loader, optimizer):
        if not cfg.SOLVER.AMP.ENABLED:
            return SimpleTrainer(model, data_loader, optimizer)
        if not torch.cuda.is_available():
            raise ValueError("SOLVER.AMP.ENABLED=True needs CUDA (Detectron2's AMPTrainer)")
        precision = getattr(torch, cfg.SOLVER.AMP.PRECISION, None)
        if precision not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"SOLVER.AMP.PRECISION={cfg.SOLVER.AMP.PRECISION!r}: use float16 or bfloat16"
            )
        return AMPTrainer(model, data_loader, optimizer, precision=precision)

    @classmethod
    def build_model(cls, cfg):
        """DefaultTrainer's model, compiled in place when MODEL.PETR.COMPILE.ENABLED (training
        and --eval-only both build the model here)."""
        return compile_model(super().build_model(cfg), cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_petr_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=PETRDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=PETRDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # like Detectron2's train_net: keep the predictions under OUTPUT_DIR/inference
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_keypoint_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate with flip / multi-scale test-time augmentation (TEST.AUG.*)."""
        logging.getLogger("detectron2.trainer").info(
            "Running inference with test-time augmentation"
        )
        model = PETRWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())
