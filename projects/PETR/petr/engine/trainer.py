"""`PETRTrainer`: Detectron2's DefaultTrainer with PETR's data, optimiser and evaluators.

Differences from DefaultTrainer:
- the official AdamW recipe (engine/solver.py);
- PETR's dataset mapper for training and testing;
- COCO / CrowdPose keypoint evaluators with the dataset's OKS sigmas;
- DistributedDataParallel without `device_ids` when the model is on CPU, so multi-process
  training also runs on CPU machines (gloo);
- AMP with a configurable precision, and a clear error when it is asked for without CUDA;
- the official training-image rule (petr.data.training_images);
- unreadable images: replaced and counted in training, skipped and counted in evaluation
  (petr.data.bad_images);
- PETRCheckpointer (official opera checkpoints as MODEL.WEIGHTS, safe loading, partial-load
  check);
- clear errors before any work: MODEL.DEVICE cuda without CUDA, a TEST dataset whose number of
  keypoints differs from the model's (petr.data.metadata.check_keypoint_compat);
- torch.compile when MODEL.PETR.COMPILE.ENABLED (build_model).
"""

import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import PETRCheckpointer
from ..config import check_config
from ..data.bad_images import BadImageMonitor, SkipUnreadableImages
from ..data.dataset_mapper import PETRDatasetMapper
from ..data.metadata import check_keypoint_compat
from ..data.training_images import petr_train_dataset_dicts
from ..evaluation import ReadImagesOnly, build_keypoint_evaluator
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
        # DefaultTrainer.__init__, except for three objects Detectron2 builds inline with no
        # build_* hook: the DDP wrapper (create_ddp_model passes device_ids=[local_rank], which
        # DDP rejects for a CPU model, so gloo training on CPU machines needs `ddp_kwargs`), the
        # step runner (DefaultTrainer's AMPTrainer ignores SOLVER.AMP.PRECISION) and the
        # checkpointer (PETRCheckpointer). Everything else comes from the build_* overrides.
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
        self.checkpointer = PETRCheckpointer.from_config(
            cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter, self.max_iter, self.cfg = 0, cfg.SOLVER.MAX_ITER, cfg
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

    def build_hooks(self):
        ret = super().build_hooks()
        loader = self._trainer.data_loader
        if isinstance(loader, BadImageMonitor):
            summary = hooks.CallbackHook(
                after_train=lambda _: logging.getLogger(__name__).info(loader.summary())
            )
            ret.insert(0, summary)
        return ret

    @classmethod
    def build_model(cls, cfg):
        """DefaultTrainer's model, after the MODEL.DEVICE check, checked against the TEST
        datasets (now, not at the first evaluation hours later), compiled in place when
        MODEL.PETR.COMPILE.ENABLED (training and --eval-only both build the model here)."""
        check_config(cfg)
        model = super().build_model(cfg)
        check_keypoint_compat(cfg, model)
        return compile_model(model, cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_petr_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's training loader over the images DATALOADER.PETR.IMAGE_FILTER keeps,
        with PETR's mapper, inside a `BadImageMonitor`."""
        loader = build_detection_train_loader(
            cfg,
            mapper=PETRDatasetMapper(cfg, is_train=True),
            dataset=petr_train_dataset_dicts(cfg),
        )
        return BadImageMonitor(loader, cfg.DATALOADER.PETR.MAX_BAD_IMAGE_SHARE)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with PETR's mapper; unreadable images are skipped."""
        loader = build_detection_test_loader(
            cfg, dataset_name, mapper=PETRDatasetMapper(cfg, is_train=False)
        )
        return SkipUnreadableImages(loader, dataset_name)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, after checking the TEST datasets against the model."""
        check_keypoint_compat(cfg, model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # like Detectron2's train_net: keep the predictions under OUTPUT_DIR/inference
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return ReadImagesOnly(build_keypoint_evaluator(cfg, dataset_name, output_folder))

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
