"""Shared helpers for the tests (no test module imports another): small configs, the official
fixture, deformable-attention inputs, Swin and criterion builders (no test data downloads)."""

import contextlib
import importlib.util
import logging
import math
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from petr import add_petr_config
from petr.data.metadata import COCO_OKS_SIGMAS
from petr.layers.ms_deform_attn import ms_deform_attn_reference
from petr.modeling.backbone.swin import PETRSwinTransformer
from petr.modeling.criterion import PETRCriterion
from petr.modeling.matcher import PETRHungarianMatcher
from petr.modeling.structures import PETROutputs, PoseTargets

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


# --- deformable attention -------------------------------------------------------------------
# name: (N, level sizes (H, W), M, D, Q, P); odd sizes, one level, D with a remainder past
# 8- and 32-wide chunks, Q = 0, and many queries on two tiny maps (contended grad_value scatter).
CASES = {
    "odd_levels": (2, ((7, 5), (3, 4), (1, 1)), 3, 13, 11, 4),
    "one_level": (1, ((6, 9),), 2, 16, 7, 3),
    "wide_channels": (3, ((4, 4), (2, 3)), 1, 40, 5, 2),
    "no_queries": (2, ((3, 3), (2, 2)), 2, 8, 0, 2),
    "contended": (2, ((2, 2), (3, 1)), 2, 8, 300, 4),
}


def make_inputs(case, dtype=torch.float64, device="cpu", lo=-0.2, hi=1.2, seed=0):
    """Inputs of a CASES entry; sampling locations uniform in [lo, hi] (outside [0, 1] too)."""
    N, sizes, M, D, Q, P = CASES[case] if isinstance(case, str) else case
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(sizes, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    L = len(sizes)
    value = torch.randn(N, int(areas.sum()), M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=torch.float64)
    floats = (t.to(device=device, dtype=dtype) for t in (value, loc, attn))
    value, loc, attn = floats
    return value, shapes.to(device), start.to(device), loc, attn


def forward_backward(fn, inputs, seed=1, **kwargs):
    """Output and gradients (value, sampling_locations, attention_weights) of a random loss."""
    value, shapes, start, loc, attn = (
        t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs
    )
    out = fn(value, shapes, start, loc, attn, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, loc, attn), g.to(out))
    return (out, *grads)


def reference_on(inputs):
    """The reference in float64 on the CPU, on exactly the given (possibly rounded) inputs."""
    return forward_backward(
        ms_deform_attn_reference,
        [t.detach().cpu().double() if t.is_floating_point() else t.cpu() for t in inputs],
    )


def assert_matches(actual, expected, tol):
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if e.numel() == 0:
            continue
        err = (a.detach().cpu().double() - e).abs().max().item()
        scale = max(1.0, e.abs().max().item())
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.0e} x {scale:.3g}"


# --- official fixture, Swin ------------------------------------------------------------------
def opera_tiny_model(weights):
    """The opera_tiny PETR with `weights` (a converted official checkpoint), loaded as
    --eval-only loads MODEL.WEIGHTS, after checking every name and shape."""
    cfg = opera_tiny_cfg()
    cfg.MODEL.WEIGHTS = weights
    model = build_model(cfg)
    # no missing and no unexpected keys, every shape right
    saved = torch.load(weights)["model"]
    assert {k: v.shape for k, v in saved.items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    # loaded the way tools/train_net.py --eval-only loads MODEL.WEIGHTS
    DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    return model


TINY = dict(embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 3, 4], window_size=7)


def tiny_swin(**kw):
    """A small Swin-T-shaped backbone (drop path off unless given)."""
    return PETRSwinTransformer(**{**TINY, "drop_path_rate": 0.0, **kw})


# --- criterion: people on a deterministic pattern (pixels), PoseTargets, by-hand focal terms ---
K = 17
WEIGHTS = dict(
    cls=2.0, kpt=70.0, oks=2.0, hm=4.0, kpt_refine=80.0, oks_refine=3.0, cls_enc=2.0, kpt_enc=70.0
)
EPS32 = torch.finfo(torch.float32).eps


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def focal_pos(x):  # alpha 0.25, gamma 2, label 1
    p = sigmoid(x)
    return -0.25 * (1 - p) ** 2 * math.log(p)


def focal_neg(x):  # label 0
    p = sigmoid(x)
    return -0.75 * p**2 * math.log(1 - p)


def person(cx, cy, h=160, w=224, visible=None, spread=20.0, area=4000.0):
    """(K, 3) pixel keypoints around (cx, cy) on a deterministic pattern, and its area."""
    k = torch.arange(K, dtype=torch.float32)
    kpts = torch.stack(
        [cx + spread * torch.cos(k), cy + spread * torch.sin(k), 2 * torch.ones(K)], 1
    )
    kpts[:, 0].clamp_(0, w - 1)
    kpts[:, 1].clamp_(0, h - 1)
    if visible is not None:
        kpts[~visible] = 0.0
    return kpts, area


def target(people, h=160, w=224):
    if people:
        kpts = torch.stack([p[0] for p in people])
        areas = torch.tensor([p[1] for p in people])
    else:
        kpts, areas = torch.zeros(0, K, 3), torch.zeros(0)
    vis = kpts[..., 2] > 0
    big = torch.tensor(1e9)
    boxes = (
        torch.stack(
            [
                torch.where(vis, kpts[..., 0], big).amin(1),
                torch.where(vis, kpts[..., 1], big).amin(1),
                torch.where(vis, kpts[..., 0], -big).amax(1),
                torch.where(vis, kpts[..., 1], -big).amax(1),
            ],
            1,
        )
        if len(kpts)
        else torch.zeros(0, 4)
    )
    return PoseTargets(keypoints=kpts, areas=areas, boxes=boxes, image_size=(h, w))


def normalised(kpts, h=160, w=224):
    """(K, 3) pixels -> (2K,) normalised interleaved."""
    return (kpts[:, :2] / torch.tensor([w, h])).reshape(-1)


def matcher(**kw):
    return PETRHungarianMatcher(oks_sigmas=COCO_OKS_SIGMAS, **kw)


def criterion(weights=WEIGHTS, m=None):
    return PETRCriterion(
        matcher=m or matcher(), num_keypoints=K, oks_sigmas=COCO_OKS_SIGMAS, weights=weights
    )


def outputs_for(pose_logits, pose_kpts, joint_kpts=None, **extra):
    """PETROutputs of the pose layers, plus optional joint, encoder and heatmap outputs."""
    return PETROutputs(pose_logits, pose_kpts, joint_kpts=joint_kpts, **extra)
