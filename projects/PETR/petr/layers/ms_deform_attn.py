"""Multi-scale deformable attention (Deformable DETR), with explicit backend dispatch.

The op's math is Deformable DETR's (SenseTime, Apache-2.0,
https://github.com/fundamentalvision/Deformable-DETR); the kernels in `csrc/` are our own.

Shapes (the de-facto standard of Deformable DETR):
    value               (N, S, M, D)         S = sum_l H_l * W_l
    spatial_shapes      (L, 2) int64 tensor, or L (H_l, W_l) pairs of Python ints
    level_start_index   (L,)   int64 tensor, or L Python ints: exclusive cumsum of H_l * W_l
    (the ints may be symbolic, torch.SymInt, under torch.compile(dynamic) and torch.export)
    sampling_locations  (N, Q, M, L, P, 2)    normalised (x, y); [0, 1] spans the level
    attention_weights   (N, Q, M, L, P)
    returns             (N, Q, M * D)
Sampling is bilinear with zero padding and pixel centres at (i + 0.5) / size
(grid_sample's align_corners=False), so points outside [0, 1] fade to zero.

Backends: `petr._C` CPU kernel (float32/float64) for CPU tensors, its CUDA kernel (float16,
bfloat16, float32, float64; accumulates in float32 or float64) for CUDA tensors. When `petr._C`
is missing or lacks the backend, `ms_deform_attn` warns once and runs the pure-PyTorch reference.
`deform_attn_backend("reference")` (a context manager) forces one backend for a block, e.g. the
reference for ONNX export, which cannot express the compiled kernel.
On torch >= 2.4 the kernels are the custom op `torch.ops.petr.ms_deform_attn` (fake tensor and
autograd registered, so torch.compile traces through it); on older torch an autograd Function.
"""

import contextlib
import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F

from petr.utils.compat import HAS_CUSTOM_OP

from .ms_deform_attn_checks import check_ms_deform_attn_inputs

__all__ = [
    "MSDeformAttnFunction",
    "BACKENDS",
    "check_ms_deform_attn_inputs",
    "deform_attn_backend",
    "ms_deform_attn",
    "ms_deform_attn_backend",
    "ms_deform_attn_reference",
]

_REQUIRED_EXT_FUNCS = (
    "ms_deform_attn_forward",
    "ms_deform_attn_backward",
    "has_cuda",
    "cpu_kernel_is_parallel",
)


def _reference(value, sizes, sampling_locations, attention_weights):
    """grid_sample implementation on validated inputs; `sizes` lists (H, W) per level."""
    N, _, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    # (N, Q, M, L, P) -> (N*M, 1, Q, L, P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Q, L, P)
    out = None
    # Weighted and summed level by level: no stack of every level's samples (N*M, D, Q, L*P),
    # which cost the exported graph a Concat and 4x the memory (tools/benchmark.py --backends).
    for lvl, (h, w) in enumerate(sizes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Q, M, P, 2) -> (N*M, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        level = (sampled * weights[:, :, :, lvl]).sum(-1)  # (N*M, D, Q)
        out = level if out is None else out + level
    return out.view(N, M * D, Q).transpose(1, 2).contiguous()


def ms_deform_attn_reference(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """Pure-PyTorch deformable attention (bilinear, zero padding, align_corners=False).

    Same contract and validation as `ms_deform_attn`; `im2col_step` is only validated.
    Returns (N, Q, M * D).
    """
    sizes = check_ms_deform_attn_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
    )
    return _reference(value, sizes, sampling_locations, attention_weights)


def _load_ext():
    """Return (petr._C, "") or (None, why it is unusable). Only import failures are caught."""
    try:
        from petr import _C
    except ImportError as e:
        return None, f"petr._C could not be imported ({e})"
    missing = [name for name in _REQUIRED_EXT_FUNCS if not hasattr(_C, name)]
    if missing:
        return None, f"petr._C is out of date (it lacks {', '.join(missing)})"
    return _C, ""


_C, _C_ERROR = _load_ext()
# Read once: pybind calls inside a traced function would break torch.compile's graph.
_C_HAS_CUDA = _C is not None and bool(_C.has_cuda())
_C_CPU_PARALLEL = _C is not None and bool(_C.cpu_kernel_is_parallel())
_warned = set()
BACKENDS = ("auto", "compiled", "reference")
# Set only by `deform_attn_backend`; read by dynamo as a guarded constant.
_forced_backend = "auto"


@contextlib.contextmanager
def deform_attn_backend(backend: str):
    """Within the block, every `ms_deform_attn` call (so every PETR attention layer) runs
    `backend`: "reference" (pure PyTorch), "compiled" (petr._C; an error where it cannot run) or
    "auto" (the kernel of the inputs' device, else the reference). Process-wide, not per thread;
    the previous choice is restored on exit, also on error."""
    global _forced_backend
    if backend not in BACKENDS:
        raise ValueError(f"deform_attn_backend: {backend!r} is not one of {BACKENDS}")
    saved, _forced_backend = _forced_backend, backend
    try:
        yield
    finally:
        _forced_backend = saved


def _missing_backend(device_type: str):
    """Why `_C` cannot run on `device_type`, or None when it can."""
    if _C is None:
        return _C_ERROR or "petr._C is not available"
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        return None if _C_HAS_CUDA else "petr._C was built without CUDA"
    return f"petr._C has no {device_type} kernel"


def ms_deform_attn_backend(device_type: str) -> str:
    """'compiled' when `ms_deform_attn` runs petr._C on `device_type` ('cpu', 'cuda'), else
    'reference' (the pure-PyTorch fallback, or forced by `deform_attn_backend`)."""
    if _forced_backend != "auto":
        return _forced_backend
    return "reference" if _missing_backend(device_type) else "compiled"


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled kernels; inputs must already be validated. The op of
    the floor stack (torch < 2.4); newer torch runs the `petr::ms_deform_attn` custom op."""

    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step
    ):
        ctx.im2col_step = step
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return _C.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, shapes, start, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = _C.ms_deform_attn_backward(
            value, shapes, start, loc, attn, grad_output.contiguous(), ctx.im2col_step
        )
        return grad_value, None, None, grad_loc, grad_attn, None


def _index_tensors(sizes: List[int], device):
    """Flat [H_0, W_0, H_1, ...] ints -> the kernels' (L, 2) shapes and (L,) start tensors."""
    shapes = torch.tensor(sizes, dtype=torch.int64).view(-1, 2)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return shapes.to(device, non_blocking=True), start.to(device, non_blocking=True)


if HAS_CUSTOM_OP:
    # The level sizes travel as ints (schema SymInt[]): symbolic sizes under
    # torch.compile(dynamic) and torch.export, with no guard on their values (the fake
    # implementation reads none). The kernels' index tensors are built on the host from the
    # concrete sizes of each call, so no device value is ever read back.

    @torch.library.custom_op("petr::ms_deform_attn", mutates_args=())
    def _msda_op(
        value: torch.Tensor,
        sizes: List[int],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        shapes, start = _index_tensors(sizes, value.device)
        loc, attn = sampling_locations.contiguous(), attention_weights.contiguous()
        return _C.ms_deform_attn_forward(value.contiguous(), shapes, start, loc, attn, im2col_step)

    @_msda_op.register_fake
    def _(value, sizes, sampling_locations, attention_weights, im2col_step):
        N, _, M, D = value.shape
        return value.new_empty(N, sampling_locations.shape[1], M * D)

    @torch.library.custom_op("petr::ms_deform_attn_backward", mutates_args=())
    def _msda_backward_op(
        value: torch.Tensor,
        sizes: List[int],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        grad_output: torch.Tensor,
        im2col_step: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shapes, start = _index_tensors(sizes, value.device)
        loc, attn = sampling_locations.contiguous(), attention_weights.contiguous()
        grads = _C.ms_deform_attn_backward(
            value.contiguous(), shapes, start, loc, attn, grad_output.contiguous(), im2col_step
        )
        return tuple(grads)

    @_msda_backward_op.register_fake
    def _(value, sizes, sampling_locations, attention_weights, grad_output, im2col_step):
        return (
            torch.empty_like(value),
            torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights),
        )

    def _setup_context(ctx, inputs, output):
        value, sizes, loc, attn, step = inputs
        ctx.sizes, ctx.im2col_step = sizes, step
        ctx.save_for_backward(value, loc, attn)

    def _backward(ctx, grad_output):
        value, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = _msda_backward_op(
            value, ctx.sizes, loc, attn, grad_output, ctx.im2col_step
        )
        return grad_value, None, grad_loc, grad_attn, None

    _msda_op.register_autograd(_backward, setup_context=_setup_context)


def _kernel(value, sizes, sampling_locations, attention_weights, im2col_step):
    """The compiled kernel on validated inputs; `sizes` lists (H, W) per level."""
    flat = [s for hw in sizes for s in hw]
    if HAS_CUSTOM_OP:
        return _msda_op(value, flat, sampling_locations, attention_weights, im2col_step)
    shapes, start = _index_tensors(flat, value.device)
    return MSDeformAttnFunction.apply(
        value, shapes, start, sampling_locations, attention_weights, im2col_step
    )


def ms_deform_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """Deformable attention on the compiled kernel of the inputs' device, else the reference.

    Shapes and coordinate convention: see the module docstring; returns (N, Q, M * D).
    Give spatial_shapes and level_start_index as Python ints to keep the call free of host
    syncs (and torch.compile graphs whole); tensors are read on the host once per call.
    `im2col_step` is kept for API compatibility with Deformable DETR; the kernels process the
    whole batch in one pass, so it does not change results or memory.
    """
    sizes = check_ms_deform_attn_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
    )
    if _forced_backend == "reference":
        return _reference(value, sizes, sampling_locations, attention_weights)
    device_type = value.device.type
    why = _missing_backend(device_type)
    if why is not None and _forced_backend == "compiled":
        raise RuntimeError(f"deform_attn_backend('compiled'): {why}")
    if why is not None:
        _warn_once(
            device_type,
            f"ms_deform_attn: {why}; using the slower pure-PyTorch reference on {device_type}. "
            "Rebuild with `pip install --no-build-isolation --no-deps -e .` to get the kernel.",
        )
        return _reference(value, sizes, sampling_locations, attention_weights)
    if device_type == "cpu" and not _C_CPU_PARALLEL and torch.get_num_threads() > 1:
        _warn_once(
            "cpu-serial",
            "ms_deform_attn: petr._C was compiled without OpenMP, so its CPU kernel runs on one "
            "thread; rebuild it with -fopenmp.",
        )
    return _kernel(value, sizes, sampling_locations, attention_weights, im2col_step)
