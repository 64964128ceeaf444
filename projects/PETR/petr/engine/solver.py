"""The official PETR optimiser: AdamW, per-name learning-rate multipliers, global grad clipping."""

import itertools
from typing import Sequence

import torch
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping


def lr_multiplier_for(name: str, keys: Sequence[str], values: Sequence[float]) -> float:
    """Multiplier of the longest key contained in the parameter's full name (1.0 if none)."""
    best, mult = -1, 1.0
    for key, value in zip(keys, values):
        if key in name and len(key) > best:
            best, mult = len(key), float(value)
    return mult


def _full_model_clipping(optimizer_cls, max_norm: float, norm_type: float):
    """Optimizer subclass whose step() first clips the global gradient norm of all its params."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"FullModelGradientClipping{optimizer_cls.__name__}"
    return FullModelGradientClipping


def build_petr_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    if len(s.LR_MULT_KEYS) != len(s.LR_MULT_VALUES):
        raise ValueError(
            f"SOLVER.LR_MULT_KEYS has {len(s.LR_MULT_KEYS)} entries but SOLVER.LR_MULT_VALUES "
            f"has {len(s.LR_MULT_VALUES)}"
        )
    params = get_default_optimizer_params(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY,  # the official recipe decays norms too
        lr_factor_func=lambda name: lr_multiplier_for(name, s.LR_MULT_KEYS, s.LR_MULT_VALUES),
    )
    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {"betas": tuple(s.BETAS)}
    elif name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={s.OPTIMIZER!r}: expected 'ADAMW' or 'SGD'")
    clip = s.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _full_model_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    elif clip.ENABLED:
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    # foreach: one multi-tensor update instead of a Python loop over ~400 tensors. PyTorch picks
    # it by itself only for CUDA; on CPU it makes the toy's AdamW step ~25% faster.
    return optimizer_cls(params, lr=s.BASE_LR, foreach=True, **kwargs)
