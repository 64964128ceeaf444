"""Input validation of `ms_deform_attn` (shapes in petr.layers.ms_deform_attn), shared by the
compiled kernels and the reference; errors name the argument at fault."""

import torch

__all__ = ["check_ms_deform_attn_inputs"]

_SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def _check_level_index(name, t, device):
    """A tensor spatial_shapes / level_start_index: int64, on `device`, contiguous."""
    if t.dtype != torch.int64:
        raise TypeError(f"ms_deform_attn: {name} must be int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"ms_deform_attn: {name} must be contiguous")


def _is_int(x) -> bool:
    """A Python int or a symbolic one (a size under torch.compile(dynamic) / torch.export), or,
    while the TorchScript tracer runs (torch 2.3's ONNX export), the 0-d tensor it makes of a
    size."""
    if isinstance(x, torch.Tensor):
        return torch.jit.is_tracing() and x.dim() == 0 and not x.is_floating_point()
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def _size(x):
    """A traced 0-d size as the int the tracer records (a fixed-size graph); anything else as is."""
    return int(x) if isinstance(x, torch.Tensor) else x


def _level_sizes(spatial_shapes, level_start_index, device):
    """(sizes, starts): the level sizes as L (H, W) int pairs and the start indices as L ints.

    Tensors are read on the host (one transfer for both); Python ints cost nothing."""
    if isinstance(spatial_shapes, torch.Tensor):
        _check_level_index("spatial_shapes", spatial_shapes, device)
        shape = tuple(spatial_shapes.shape)
        if len(shape) != 2 or shape[1] != 2 or shape[0] == 0:
            raise ValueError(
                f"ms_deform_attn: spatial_shapes must be (L, 2) with L >= 1, got shape {shape}"
            )
        L = shape[0]
    elif isinstance(spatial_shapes, (list, tuple)):
        L = len(spatial_shapes)
        if L == 0 or not all(
            isinstance(hw, (list, tuple)) and len(hw) == 2 and all(map(_is_int, hw))
            for hw in spatial_shapes
        ):
            raise ValueError(
                "ms_deform_attn: spatial_shapes must be (L, 2) with L >= 1: an int64 tensor or "
                f"L (H, W) int pairs, got {spatial_shapes!r}"
            )
    else:
        raise TypeError(
            "ms_deform_attn: spatial_shapes must be a torch.Tensor or a sequence of (H, W) ints, "
            f"got {type(spatial_shapes).__name__}"
        )
    if isinstance(level_start_index, torch.Tensor):
        _check_level_index("level_start_index", level_start_index, device)
        start_shape = tuple(level_start_index.shape)
    elif isinstance(level_start_index, (list, tuple)):
        if not all(map(_is_int, level_start_index)):
            raise TypeError(
                f"ms_deform_attn: level_start_index must hold ints, got {level_start_index!r}"
            )
        start_shape = (len(level_start_index),)
    else:
        raise TypeError(
            "ms_deform_attn: level_start_index must be a torch.Tensor or a sequence of ints, "
            f"got {type(level_start_index).__name__}"
        )
    if start_shape != (L,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) = ({L},), got shape {start_shape}"
        )
    read = [t.flatten() for t in (spatial_shapes, level_start_index) if isinstance(t, torch.Tensor)]
    flat = torch.cat(read).tolist() if read else []  # one transfer (a single sync on CUDA)
    if isinstance(spatial_shapes, torch.Tensor):
        sizes, flat = [(flat[2 * i], flat[2 * i + 1]) for i in range(L)], flat[2 * L :]
    else:
        # no int(): it would pin a symbolic size
        sizes = [(_size(h), _size(w)) for h, w in spatial_shapes]
    starts = (
        flat
        if isinstance(level_start_index, torch.Tensor)
        else [_size(s) for s in level_start_index]
    )
    return sizes, starts


def check_ms_deform_attn_inputs(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """Validate the op's inputs (shapes in the module docstring) for every backend.

    Raises TypeError (wrong type or dtype) or ValueError (shape, device, layout or level sizes),
    naming the argument at fault. Returns the level sizes as a list of (H, W) ints (symbolic
    ones stay symbolic: the checks below hold for every size, so they add no guard). Index
    tensors are read on the host (one device-to-host copy for CUDA inputs); Python ints are not.
    """
    args = {
        "value": value,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
    if not _is_int(im2col_step) or im2col_step <= 0:
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
    for name, t in args.items():
        if t.device != device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {device}")
        if not t.is_contiguous():
            raise ValueError(f"ms_deform_attn: {name} must be contiguous")
    sizes, starts = _level_sizes(spatial_shapes, level_start_index, device)

    N, S, M, _ = value.shape
    L = len(sizes)
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
    total = 0
    for lvl, (h, w) in enumerate(sizes):
        if h <= 0 or w <= 0:
            raise ValueError(
                f"ms_deform_attn: spatial_shapes[{lvl}] must be positive, got ({h}, {w})"
            )
        if starts[lvl] != total:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{lvl}] is {starts[lvl]} but the levels "
                f"before it hold {total} tokens"
            )
        total += h * w
    if total != S:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {sizes} cover {total} tokens but value has S={S}"
        )
    return sizes
