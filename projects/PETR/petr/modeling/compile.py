"""torch.compile of a PETR model, as MODEL.PETR.COMPILE asks.

The model is compiled in place (`nn.Module.compile`), so its class, attributes and state-dict
keys stay those of the eager model: checkpoints load and save as before, and code that calls
its parts (`model.encode`, TTA, export) runs them eagerly. Inference traces as one graph: level
sizes are Python ints and deformable attention is a custom op (torch >= 2.4; older torch breaks
the graph around each attention call, see petr.utils.compat.HAS_CUSTOM_OP).

Every input size compiles its own graph (the first call at a size pays the compilation); past
torch._dynamo.config.cache_size_limit sizes (8 by default) dynamo runs the model eagerly. So
compile pays off for inputs of a few fixed sizes (video, a fixed test resolution), not for a
COCO evaluation where nearly every image has its own size.
"""

import logging

import torch.nn as nn

__all__ = ["COMPILE_MODES", "compile_model"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model: nn.Module, cfg, force: bool = False, mode: str | None = None) -> nn.Module:
    """Compile `model` in place when MODEL.PETR.COMPILE.ENABLED (or `force`) is set, with
    MODEL.PETR.COMPILE.MODE (or `mode`). Returns the model."""
    if not (force or cfg.MODEL.PETR.COMPILE.ENABLED):
        return model
    mode = mode or cfg.MODEL.PETR.COMPILE.MODE
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"MODEL.PETR.COMPILE.MODE={mode!r} is not a torch.compile mode; use one of "
            f"{', '.join(COMPILE_MODES)}"
        )
    logging.getLogger(__name__).info("Compiling the model with torch.compile(mode=%r)", mode)
    # dynamic=False: level sizes are Python ints, so each input size gets its own graph anyway
    model.compile(mode=mode, dynamic=False)
    return model
