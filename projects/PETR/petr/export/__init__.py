"""Export of PETR inference to ONNX (see onnx_wrapper for the limits)."""

from .onnx_predictor import PETRONNXPredictor
from .onnx_wrapper import (
    PETRONNXWrapper,
    compare_predictions,
    export_petr_onnx,
    run_onnxruntime,
    run_reference,
)

__all__ = [
    "PETRONNXPredictor",
    "PETRONNXWrapper",
    "compare_predictions",
    "export_petr_onnx",
    "run_onnxruntime",
    "run_reference",
]
