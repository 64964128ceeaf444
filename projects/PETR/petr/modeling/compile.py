"""torch.compile of a PETR model, as MODEL.PETR.COMPILE asks.

The model is compiled in place (`nn.Module.compile`), so its class, attributes and state-dict
keys stay those of the eager model: checkpoints load and save as before, and code that calls
its parts (`model.encode`, TTA, export) runs them eagerly. Inference traces as one graph:
deformable attention is a custom op (torch >= 2.4; older torch breaks the graph around each
attention call, see petr.utils.compat.HAS_CUSTOM_OP) whose level sizes are plain or symbolic
ints, never read back from a tensor.

MODEL.PETR.COMPILE.DYNAMIC (default) compiles with `dynamic=True`: every dimension of the input
images is symbolic from the first call and the feature-map sizes derive from them, so one graph
serves every image size (a COCO evaluation compiles once, not once per size). The batch is the
length of Detectron2's list of input dicts, a Python constant, so each batch size traces its
own graph (one for evaluation at batch 1). One caveat, PyTorch's and CPU only: at batch 1 the
CPU convolution picks oneDNN or its native kernel by the input's element count (20480), and the
trace guards that choice; a convolution whose input straddles it (narrow layers on small maps,
e.g. the toy model's, not R50 at COCO sizes) splits the sizes into a few ranges, a graph each
(range guards, not one size each). DYNAMIC False compiles one graph per input size, as
before: past torch._dynamo.config.recompile_limit sizes (8) dynamo runs the model eagerly, so
that suits inputs of a few fixed sizes (video, a fixed test resolution) only.

Before torch 2.4 (the 2024 floor stack) DYNAMIC is not honoured: the attention kernel breaks the
graph there anyway, and inductor's symbolic-size graphs of PETR (torch 2.3.1) gave scores up to
8e-3 away from eager on the official tiny model, so the model compiles one graph per size.
"""

import logging

import torch.nn as nn

from petr.utils.compat import HAS_CUSTOM_OP

__all__ = ["COMPILE_MODES", "compile_model"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(
    model: nn.Module, cfg, force: bool = False, mode: str | None = None, backend="inductor"
) -> nn.Module:
    """Compile `model` in place when MODEL.PETR.COMPILE.ENABLED (or `force`) is set, with
    MODEL.PETR.COMPILE.MODE (or `mode`) and MODEL.PETR.COMPILE.DYNAMIC. `backend` is
    torch.compile's (tests count graphs with dynamo's CompileCounter; MODE then does not
    apply). Returns the model."""
    if not (force or cfg.MODEL.PETR.COMPILE.ENABLED):
        return model
    mode = mode or cfg.MODEL.PETR.COMPILE.MODE
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"MODEL.PETR.COMPILE.MODE={mode!r} is not a torch.compile mode; use one of "
            f"{', '.join(COMPILE_MODES)}"
        )
    dynamic = bool(cfg.MODEL.PETR.COMPILE.DYNAMIC)
    log = logging.getLogger(__name__)
    if dynamic and not HAS_CUSTOM_OP:
        log.warning(
            "MODEL.PETR.COMPILE.DYNAMIC is ignored on torch < 2.4 (symbolic-size graphs there "
            "differ from eager): compiling one graph per input size"
        )
        dynamic = False
    log.info("Compiling the model with torch.compile(mode=%r, dynamic=%s)", mode, dynamic)
    if backend == "inductor":
        model.compile(mode=mode, dynamic=dynamic)
    else:
        model.compile(backend=backend, dynamic=dynamic)
    return model
