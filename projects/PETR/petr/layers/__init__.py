from .ms_deform_attn import (
    MSDeformAttnFunction,
    ms_deform_attn,
    ms_deform_attn_reference,
)

__all__ = ["MSDeformAttnFunction", "ms_deform_attn", "ms_deform_attn_reference"]
