"""Per-stage wall time of an eager PETR forward, from forward hooks on the model's parts."""

import time
from typing import Dict, List

import torch
import torch.nn as nn

__all__ = ["STAGES", "StageTimer"]

# (label, attribute of the PETR model), in the order the forward runs them.
STAGES = (
    ("backbone", "backbone"),
    ("neck", "neck"),
    ("encoder", "encoder"),
    ("proposals", "proposals"),
    ("pose decoder", "pose_decoder"),
    ("joint decoder", "joint_decoder"),
)


class StageTimer:
    """Accumulates the time spent in each stage while attached (`with timer:`). Only for eager
    runs: detach before calling a compiled model, whose graph has no stage boundaries.
    On CUDA each boundary synchronises, so the times add up to the forward."""

    def __init__(self, model: nn.Module, device: str):
        self.model = model
        self.cuda = device.startswith("cuda")
        self.totals: Dict[str, float] = {label: 0.0 for label, _ in STAGES}
        self.calls = 0
        self._handles: List = []
        self._start: Dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self):
        for label, attr in STAGES:
            module = getattr(self.model, attr)

            def pre(_module, _args, label=label):
                self._start[label] = self._now()

            def post(_module, _args, _output, label=label):
                self.totals[label] += self._now() - self._start.pop(label)

            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post))
        self.calls += 1
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._start.clear()

    def mean_ms(self) -> Dict[str, float]:
        """Mean ms per attached call, by stage label."""
        return {label: 1000.0 * t / max(self.calls, 1) for label, t in self.totals.items()}
