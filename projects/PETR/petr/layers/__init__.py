from .ms_deform_attn import (
    BACKENDS,
    MSDeformAttnFunction,
    check_ms_deform_attn_inputs,
    deform_attn_backend,
    ms_deform_attn,
    ms_deform_attn_backend,
    ms_deform_attn_reference,
)

__all__ = [
    "BACKENDS",
    "MSDeformAttnFunction",
    "check_ms_deform_attn_inputs",
    "deform_attn_backend",
    "ms_deform_attn",
    "ms_deform_attn_backend",
    "ms_deform_attn_reference",
]
