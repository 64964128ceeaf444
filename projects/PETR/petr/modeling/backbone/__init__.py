from .channel_mapper import PETRChannelMapper
from .swin import PETRSwinTransformer, build_swin_backbone  # registration

__all__ = ["PETRChannelMapper", "PETRSwinTransformer", "build_swin_backbone"]
