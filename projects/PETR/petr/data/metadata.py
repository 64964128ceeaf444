"""Keypoint metadata PETR reads from a dataset's `MetadataCatalog` entry.

Standard Detectron2 keys: `keypoint_names`, `keypoint_flip_map`, `keypoint_connection_rules`.
PETR adds `keypoint_oks_sigmas`: one OKS sigma per keypoint (the COCO definition, kappa = 2 sigma).
"""

COCO_OKS_SIGMAS = [
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
]  # fmt: skip
CROWDPOSE_OKS_SIGMAS = [
    0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
    0.079, 0.079,
]  # fmt: skip
_DEFAULT_SIGMAS = {17: COCO_OKS_SIGMAS, 14: CROWDPOSE_OKS_SIGMAS}


def num_keypoints_from_metadata(metadata, default=None):
    """K from `keypoint_names`; `default` when the entry has none."""
    names = getattr(metadata, "keypoint_names", None) if metadata is not None else None
    if names:
        return len(names)
    if default is None:
        raise ValueError(f"metadata {getattr(metadata, 'name', metadata)!r} has no keypoint_names")
    return default


def oks_sigmas_from_metadata(metadata, num_keypoints, override=()):
    """OKS sigmas: `override` (config), else `keypoint_oks_sigmas`, else COCO/CrowdPose by K."""
    name = getattr(metadata, "name", "<no dataset>")
    if override:
        sigmas, source = list(override), "MODEL.PETR.OKS_SIGMAS"
    elif metadata is not None and getattr(metadata, "keypoint_oks_sigmas", None):
        sigmas, source = list(metadata.keypoint_oks_sigmas), f"metadata {name!r}"
    elif num_keypoints in _DEFAULT_SIGMAS:
        sigmas, source = list(_DEFAULT_SIGMAS[num_keypoints]), "defaults"
    else:
        raise ValueError(
            f"No OKS sigmas for {num_keypoints} keypoints: set `keypoint_oks_sigmas` in the "
            f"metadata of {name!r} or MODEL.PETR.OKS_SIGMAS"
        )
    if len(sigmas) != num_keypoints:
        raise ValueError(f"{source} gives {len(sigmas)} OKS sigmas for {num_keypoints} keypoints")
    return [float(s) for s in sigmas]
