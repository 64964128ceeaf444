"""Keypoint metadata PETR reads from a dataset's `MetadataCatalog` entry: `KeypointSpec`.

Standard Detectron2 keys: `keypoint_names`, `keypoint_flip_map`, `keypoint_connection_rules`.
PETR adds `keypoint_oks_sigmas`: one OKS sigma per keypoint (the COCO definition, kappa = 2 sigma).
The model, the dataset mapper, test-time augmentation and the evaluators all resolve K, the flip
indices and the OKS sigmas here, so they cannot disagree.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple

from detectron2.data import MetadataCatalog

__all__ = [
    "COCO_OKS_SIGMAS",
    "CROWDPOSE_OKS_SIGMAS",
    "KeypointSpec",
    "check_keypoint_compat",
    "check_metadata_keypoints",
    "keypoint_spec",
]

COCO_OKS_SIGMAS = [
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
]  # fmt: skip
CROWDPOSE_OKS_SIGMAS = [
    0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
    0.079, 0.079,
]  # fmt: skip
_DEFAULT_SIGMAS = {17: COCO_OKS_SIGMAS, 14: CROWDPOSE_OKS_SIGMAS}


@dataclass(frozen=True)
class KeypointSpec:
    """The keypoints of one dataset.

    num_keypoints: K. flip_indices: (K,) flip_indices[k] = the joint that k becomes under a
    horizontal flip, None without a flip map. oks_sigmas: (K,) OKS sigmas, None when nothing
    gives them. names: the K `keypoint_names`, empty when K came from a default.
    """

    num_keypoints: int
    flip_indices: Tuple[int, ...] | None
    oks_sigmas: Tuple[float, ...] | None
    names: Tuple[str, ...] = ()

    @classmethod
    def from_metadata(
        cls,
        metadata,
        *,
        default_num_keypoints: int | None = None,
        oks_sigmas: Sequence[float] = (),
        sigmas_key: str | None = None,
        flip_key: str | None = None,
    ) -> "KeypointSpec":
        """The spec of a `MetadataCatalog` entry (None: no dataset).

        K: len(keypoint_names), else `default_num_keypoints` (None: no names is an error).
        OKS sigmas: `oks_sigmas` (a config override) if given, else `keypoint_oks_sigmas`, else
        the COCO / CrowdPose sigmas for K = 17 / 14. `sigmas_key` names the override's config
        key; given, sigmas are required. `flip_key` names the config key that asks for flips;
        given, the flip map is required. Errors name the dataset and the key.
        """
        name = getattr(metadata, "name", "<no dataset>")
        get = metadata.get if metadata is not None else (lambda key, default=None: default)
        names = tuple(get("keypoint_names") or ())
        if names:
            num_k = len(names)
        elif default_num_keypoints is not None:
            num_k = int(default_num_keypoints)
        else:
            raise ValueError(f"metadata {name!r} has no keypoint_names")
        pairs = get("keypoint_flip_map")
        flip = _flip_indices(name, names, pairs) if names and pairs is not None else None
        if flip is None and flip_key:
            raise ValueError(
                f"{flip_key} needs keypoint_names and keypoint_flip_map in the metadata of "
                f"dataset {name!r}; turn {flip_key} off otherwise"
            )
        sigmas = _oks_sigmas(name, get("keypoint_oks_sigmas"), num_k, oks_sigmas, sigmas_key)
        return cls(num_k, flip, sigmas, names)


def keypoint_spec(dataset_names: Sequence[str], **kwargs) -> KeypointSpec:
    """The `KeypointSpec` of the first of `dataset_names` (of no dataset when empty; kwargs as
    `KeypointSpec.from_metadata`), after checking that the others agree with it: the same K
    (one without keypoint_names counts as the first's K) and, with `flip_key`, the same
    keypoint_names and flip map."""
    names = list(dataset_names)
    first = KeypointSpec.from_metadata(MetadataCatalog.get(names[0]) if names else None, **kwargs)
    flip_key = kwargs.get("flip_key")
    for other in names[1:]:
        spec = KeypointSpec.from_metadata(
            MetadataCatalog.get(other), default_num_keypoints=first.num_keypoints, flip_key=flip_key
        )
        if spec.num_keypoints != first.num_keypoints:
            raise ValueError(
                f"Datasets {names[0]!r} and {other!r} have {first.num_keypoints} vs "
                f"{spec.num_keypoints} keypoints: datasets used together need the same joints"
            )
        if flip_key and (spec.names, spec.flip_indices) != (first.names, first.flip_indices):
            raise ValueError(
                f"Datasets {names[0]!r} and {other!r} differ in keypoint_names or "
                f"keypoint_flip_map, which {flip_key} needs to be the same"
            )
    return first


def _model_spec(model) -> KeypointSpec:
    """The `keypoint_spec` of a PETR, through DDP (`.module`) and TTA (`.model`) wrappers."""
    inner = model
    while not hasattr(inner, "keypoint_spec"):
        inner = getattr(inner, "module", None) or getattr(inner, "model", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} is not a PETR model (no keypoint_spec)")
    return inner.keypoint_spec


def check_metadata_keypoints(metadata, num_keypoints: int) -> None:
    """Raise when a dataset's `keypoint_names` do not number `num_keypoints` (the model's K):
    its evaluation would fail in COCOeval after the whole inference, and its drawings would
    mislabel every joint. The error names the dataset, its json file and both Ks."""
    names = metadata.get("keypoint_names")
    if names and len(names) != num_keypoints:
        json_file = metadata.get("json_file")
        source = f" ({json_file})" if json_file else ""
        raise ValueError(
            f"TEST dataset {metadata.name!r}{source} has {len(names)} keypoint_names but the "
            f"model predicts {num_keypoints} keypoints: evaluate on and draw with a dataset of "
            "the model's joints (DATASETS.TEST)"
        )


def check_keypoint_compat(cfg, model) -> KeypointSpec:
    """The one check that cfg.DATASETS.TEST fits `model` (a PETR, possibly wrapped): every TEST
    dataset names as many keypoints as the model predicts. Called by the trainer, --eval-only,
    TTA and the demo (images and video) before any work. Returns the model's KeypointSpec."""
    spec = _model_spec(model)
    for name in cfg.DATASETS.TEST:
        check_metadata_keypoints(MetadataCatalog.get(name), spec.num_keypoints)
    return spec


def _flip_indices(name, names, pairs) -> Tuple[int, ...]:
    swap = {}
    for a, b in pairs:
        if a not in names or b not in names:
            raise ValueError(f"keypoint_flip_map of {name!r}: ({a!r}, {b!r}) not in keypoint_names")
        swap[a], swap[b] = b, a
    return tuple(names.index(swap.get(n, n)) for n in names)


def _oks_sigmas(name, from_metadata, num_k, override, key) -> Tuple[float, ...] | None:
    if override:
        sigmas, source = list(override), key or "the given oks_sigmas"
    elif from_metadata:
        sigmas, source = list(from_metadata), f"metadata {name!r}"
    elif num_k in _DEFAULT_SIGMAS:
        sigmas, source = list(_DEFAULT_SIGMAS[num_k]), "defaults"
    elif key:
        raise ValueError(
            f"No OKS sigmas for {num_k} keypoints: set `keypoint_oks_sigmas` in the metadata of "
            f"{name!r} or {key}"
        )
    else:
        return None
    if len(sigmas) != num_k:
        raise ValueError(f"{source} gives {len(sigmas)} OKS sigmas for {num_k} keypoints")
    return tuple(float(s) for s in sigmas)
