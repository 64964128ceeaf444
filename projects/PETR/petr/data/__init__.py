from . import datasets as _datasets  # noqa: F401  (registration)
from .metadata import (
    COCO_OKS_SIGMAS,
    CROWDPOSE_OKS_SIGMAS,
    num_keypoints_from_metadata,
    oks_sigmas_from_metadata,
)

__all__ = [
    "COCO_OKS_SIGMAS",
    "CROWDPOSE_OKS_SIGMAS",
    "num_keypoints_from_metadata",
    "oks_sigmas_from_metadata",
]
