from . import datasets as _datasets  # noqa: F401  (registration)
from .metadata import COCO_OKS_SIGMAS, CROWDPOSE_OKS_SIGMAS, KeypointSpec, keypoint_spec

__all__ = ["COCO_OKS_SIGMAS", "CROWDPOSE_OKS_SIGMAS", "KeypointSpec", "keypoint_spec"]
