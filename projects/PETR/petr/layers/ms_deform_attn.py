"""Multi-scale deformable attention (Deformable DETR), with explicit backend dispatch.

Shapes (the de-facto standard of Deformable DETR):
    value               (N, S, M, D)         S = sum_l H_l * W_l
    spatial_shapes      (L, 2) int64          (H_l, W_l)
    level_start_index   (L,)   int64
    sampling_locations  (N, Q, M, L, P, 2)    normalised (x, y); [0, 1] spans the level
    attention_weights   (N, Q, M, L, P)
    returns             (N, Q, M * D)
"""

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """Pure-PyTorch deformable attention: bilinear, zero padding, align_corners=False."""
    del level_start_index, im2col_step  # the reference needs neither
    N, _, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    # grid_sample wants [-1, 1]
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, int(h), int(w))
        # (N, Q, M, P, 2) -> (N*M, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*M, D, Q, P)
    # (N, Q, M, L, P) -> (N*M, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Q)
    return out.view(N, M * D, Q).transpose(1, 2).contiguous()


def _load_ext():
    """Return the compiled extension, or None when it was not built (import error only)."""
    try:
        from petr import _C
    except ImportError:
        return None
    return _C


_C = _load_ext()
_warned_fallback = set()


def _has_backend(device_type: str) -> bool:
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.has_cuda())
    return False


def _warn_fallback(device_type: str) -> None:
    if device_type in _warned_fallback:
        return
    _warned_fallback.add(device_type)
    import warnings

    why = "petr._C is not built" if _C is None else f"petr._C has no {device_type} kernel"
    warnings.warn(
        f"ms_deform_attn: {why}; using the slower pure-PyTorch reference on {device_type}. "
        "Rebuild with `pip install --no-build-isolation -e .` to get the compiled kernel.",
        RuntimeWarning,
        stacklevel=3,
    )


class MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step
    ):
        ctx.im2col_step = step
        out = _C.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step
        )
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return out

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
    """Deformable attention on the compiled kernel of the inputs' device, else the reference."""
    device_type = value.device.type
    if not _has_backend(device_type):
        _warn_fallback(device_type)
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
    )
