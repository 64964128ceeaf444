from .ms_deform_attn import (
    MSDeformAttnFunction,
    check_ms_deform_attn_inputs,
    ms_deform_attn,
    ms_deform_attn_backend,
    ms_deform_attn_reference,
)

__all__ = [
    "MSDeformAttnFunction",
    "check_ms_deform_attn_inputs",
    "ms_deform_attn",
    "ms_deform_attn_backend",
    "ms_deform_attn_reference",
]
