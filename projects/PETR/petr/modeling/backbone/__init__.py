from .channel_mapper import PETRChannelMapper

__all__ = ["PETRChannelMapper"]
