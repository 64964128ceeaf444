"""Multi-scale deformable attention (Deformable DETR), with explicit backend dispatch.

The op's math is Deformable DETR's (SenseTime, Apache-2.0,
https://github.com/fundamentalvision/Deformable-DETR); the kernels in `csrc/` are our own.

Shapes (the de-facto standard of Deformable DETR):
    value               (N, S, M, D)         S = sum_l H_l * W_l
    spatial_shapes      (L, 2) int64          (H_l, W_l) of each level
    level_start_index   (L,)   int64          exclusive cumsum of H_l * W_l
    sampling_locations  (N, Q, M, L, P, 2)    normalised (x, y); [0, 1] spans the level
    attention_weights   (N, Q, M, L, P)
    returns             (N, Q, M * D)
Sampling is bilinear with zero padding and pixel centres at (i + 0.5) / size
(grid_sample's align_corners=False), so points outside [0, 1] fade to zero.

Backends: `petr._C` CPU kernel (float32/float64) for CPU tensors, its CUDA kernel (float16,
bfloat16, float32, float64; accumulates in float32 or float64) for CUDA tensors. When `petr._C`
is missing or lacks the backend, `ms_deform_attn` warns once and runs the pure-PyTorch reference.
"""

import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "MSDeformAttnFunction",
    "check_ms_deform_attn_inputs",
    "ms_deform_attn",
    "ms_deform_attn_backend",
    "ms_deform_attn_reference",
]

_SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
_REQUIRED_EXT_FUNCS = (
    "ms_deform_attn_forward",
    "ms_deform_attn_backward",
    "has_cuda",
    "cpu_kernel_is_parallel",
)


def check_ms_deform_attn_inputs(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """Validate the op's inputs (shapes in the module docstring) for every backend.

    Raises TypeError (wrong type or dtype) or ValueError (shape, device, layout or level sizes),
    naming the argument at fault. Returns the level sizes as a list of (H, W) ints; reading them
    costs one device-to-host copy of the (small) index tensors for CUDA inputs.
    """
    args = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
    if isinstance(im2col_step, bool) or not isinstance(im2col_step, int) or im2col_step <= 0:
        raise ValueError(f"ms_deform_attn: im2col_step must be a positive int, got {im2col_step!r}")
    if value.dim() != 4:
        raise ValueError(
            f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}"
        )
    device = value.device
    allowed = _SUPPORTED_DTYPES.get(device.type)
    if not value.is_floating_point() or (allowed is not None and value.dtype not in allowed):
        names = ", ".join(str(d) for d in allowed) if allowed else "floating point"
        raise TypeError(
            f"ms_deform_attn: value dtype {value.dtype} is not supported on {device.type} "
            f"(supported: {names})"
        )
    for name in ("sampling_locations", "attention_weights"):
        if args[name].dtype != value.dtype:
            raise TypeError(
                f"ms_deform_attn: {name} has dtype {args[name].dtype} but value has {value.dtype}; "
                "they must match"
            )
    for name in ("spatial_shapes", "level_start_index"):
        if args[name].dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {args[name].dtype}")
    for name, t in args.items():
        if t.device != device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {device}")
        if not t.is_contiguous():
            raise ValueError(f"ms_deform_attn: {name} must be contiguous")

    N, S, M, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] == 0:
        raise ValueError(
            "ms_deform_attn: spatial_shapes must be (L, 2) with L >= 1, "
            f"got shape {tuple(spatial_shapes.shape)}"
        )
    L = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) = ({L},), "
            f"got shape {tuple(level_start_index.shape)}"
        )
    loc_shape = tuple(sampling_locations.shape)
    if (
        len(loc_shape) != 6
        or loc_shape[0] != N
        or loc_shape[2] != M
        or loc_shape[3] != L
        or loc_shape[5] != 2
    ):
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (N, Q, M, L, P, 2) with N={N}, M={M}, "
            f"L={L}, got shape {loc_shape}"
        )
    if tuple(attention_weights.shape) != loc_shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (N, Q, M, L, P) = {loc_shape[:5]}, "
            f"got shape {tuple(attention_weights.shape)}"
        )

    # One transfer for both index tensors (a single sync on CUDA).
    flat = torch.cat([spatial_shapes.flatten(), level_start_index]).tolist()
    sizes = [(flat[2 * i], flat[2 * i + 1]) for i in range(L)]
    total = 0
    for lvl, (h, w) in enumerate(sizes):
        if h <= 0 or w <= 0:
            raise ValueError(
                f"ms_deform_attn: spatial_shapes[{lvl}] must be positive, got ({h}, {w})"
            )
        if flat[2 * L + lvl] != total:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{lvl}] is {flat[2 * L + lvl]} but the levels "
                f"before it hold {total} tokens"
            )
        total += h * w
    if total != S:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {sizes} cover {total} tokens but value has S={S}"
        )
    return sizes


def _reference(value, sizes, sampling_locations, attention_weights):
    """grid_sample implementation on validated inputs; `sizes` lists (H, W) per level."""
    N, _, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(sizes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Q, M, P, 2) -> (N*M, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*M, D, Q, P)
    # (N, Q, M, L, P) -> (N*M, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Q)
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
_warned = set()


def _missing_backend(device_type: str):
    """Why `_C` cannot run on `device_type`, or None when it can."""
    if _C is None:
        return _C_ERROR or "petr._C is not available"
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        return None if _C.has_cuda() else "petr._C was built without CUDA"
    return f"petr._C has no {device_type} kernel"


def ms_deform_attn_backend(device_type: str) -> str:
    """'compiled' when `ms_deform_attn` runs petr._C on `device_type` ('cpu', 'cuda'), else
    'reference' (the pure-PyTorch fallback)."""
    return "reference" if _missing_backend(device_type) else "compiled"


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled kernels; inputs must already be validated."""

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


def ms_deform_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """Deformable attention on the compiled kernel of the inputs' device, else the reference.

    Shapes and coordinate convention: see the module docstring; returns (N, Q, M * D).
    `im2col_step` is kept for API compatibility with Deformable DETR; the kernels process the
    whole batch in one pass, so it does not change results or memory.
    """
    sizes = check_ms_deform_attn_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
    )
    device_type = value.device.type
    why = _missing_backend(device_type)
    if why is not None:
        _warn_once(
            device_type,
            f"ms_deform_attn: {why}; using the slower pure-PyTorch reference on {device_type}. "
            "Rebuild with `pip install --no-build-isolation --no-deps -e .` to get the kernel.",
        )
        return _reference(value, sizes, sampling_locations, attention_weights)
    if device_type == "cpu" and torch.get_num_threads() > 1 and not _C.cpu_kernel_is_parallel():
        _warn_once(
            "cpu-serial",
            "ms_deform_attn: petr._C was compiled without OpenMP, so its CPU kernel runs on one "
            "thread; rebuild it with -fopenmp.",
        )
    return MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
    )
