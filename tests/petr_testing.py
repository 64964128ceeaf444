"""Shared helpers for the tests: small configs and synthetic inputs (no test data downloads)."""

import contextlib
import importlib.util
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances, Keypoints

from petr import add_petr_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")
OPERA_TINY = os.path.join(REPO_ROOT, "tests", "data", "opera_tiny")
# Name/shape/dtype listings of the four official checkpoints (copies of shared/reference).
OPERA_STATE_DICTS = os.path.join(REPO_ROOT, "tests", "data", "opera_state_dicts")


@contextlib.contextmanager
def captured_log(logger_name: str, level: int = logging.INFO):
    """Yields the list of messages `logger_name` (and its children) log at `level` or above
    while the block runs; the logger's level is restored afterwards."""
    messages = []
    handler = logging.Handler(level)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def load_tool(name: str):
    """Import tools/<name>.py (a script, not a package module) as a module."""
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"petr_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cfg(name: str):
    cfg = get_cfg()
    add_petr_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def opera_tiny_cfg():
    """The configuration of the official opera_tiny fixture (see tests/data/opera_tiny/README.md),
    with dropout 0 as its training losses were computed."""
    cfg = load_cfg("Base-PETR.yaml")
    r = cfg.MODEL.RESNETS
    r.STEM_OUT_CHANNELS, r.NUM_GROUPS, r.WIDTH_PER_GROUP, r.RES2_OUT_CHANNELS = 16, 1, 16, 64
    p = cfg.MODEL.PETR
    p.HIDDEN_DIM, p.DIM_FEEDFORWARD, p.ENC_LAYERS = 64, 128, 2
    p.NUM_QUERIES = 30
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    p.DROPOUT = 0.0
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    return cfg


def shrink_cfg(cfg):
    """Make any PETR config small enough for a CPU training step in a second or two."""
    p = cfg.MODEL.PETR
    p.HIDDEN_DIM, p.DIM_FEEDFORWARD, p.KPT_HEAD_HIDDEN_DIM = 32, 64, 32
    p.ENC_LAYERS, p.NUM_QUERIES, cfg.TEST.DETECTIONS_PER_IMAGE = 1, 12, 5
    if cfg.MODEL.BACKBONE.NAME == "build_swin_backbone":
        s = cfg.MODEL.SWIN
        s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS = 32, [1, 1, 1, 1], [1, 2, 4, 8]
        s.DROP_PATH_RATE = 0.1
    else:
        r = cfg.MODEL.RESNETS
        r.STEM_OUT_CHANNELS, r.NUM_GROUPS, r.WIDTH_PER_GROUP, r.RES2_OUT_CHANNELS = 16, 1, 8, 32
    return cfg


def tight_boxes(keypoints: torch.Tensor) -> torch.Tensor:
    """(G, K, 3) pixels -> (G, 4) xyxy boxes of the visible joints."""
    vis = keypoints[..., 2] > 0
    inf = torch.tensor(float("inf"))
    x, y = keypoints[..., 0], keypoints[..., 1]
    return torch.stack(
        [
            torch.where(vis, x, inf).amin(1),
            torch.where(vis, y, inf).amin(1),
            torch.where(vis, x, -inf).amax(1),
            torch.where(vis, y, -inf).amax(1),
        ],
        -1,
    )


def make_instances(keypoints: torch.Tensor, areas: torch.Tensor, image_size) -> Instances:
    """Training targets as PETRDatasetMapper produces them. keypoints (G, K, 3) pixels."""
    inst = Instances(tuple(image_size))
    inst.gt_keypoints = Keypoints(keypoints)
    inst.gt_boxes = Boxes(tight_boxes(keypoints) if len(keypoints) else torch.zeros(0, 4))
    inst.gt_areas = areas.float()
    inst.gt_classes = torch.zeros(len(keypoints), dtype=torch.int64)
    return inst


def random_person_batch(num_keypoints, sizes, people, seed=0):
    """Synthetic training inputs: images of `sizes` (h, w) with `people[i]` random poses."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for (h, w), n in zip(sizes, people):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(n, num_keypoints, 2, generator=g) * torch.tensor([w - 1.0, h - 1.0])
        vis = (torch.rand(n, num_keypoints, generator=g) > 0.3).float() * 2
        vis[:, 0] = 2  # at least one visible joint per person
        kpts = torch.cat([xy, vis[..., None]], -1) * (vis[..., None] > 0)
        areas = torch.rand(n, generator=g) * h * w * 0.3 + 50
        batch.append({"image": img, "instances": make_instances(kpts, areas, (h, w))})
    return batch
