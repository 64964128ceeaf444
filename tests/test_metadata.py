"""KeypointSpec: K, flip indices and OKS sigmas from a dataset's MetadataCatalog entry."""

import dataclasses

import pytest
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils

from petr.data.metadata import COCO_OKS_SIGMAS, CROWDPOSE_OKS_SIGMAS, KeypointSpec, keypoint_spec

COCO = "keypoints_coco_2017_val"  # Detectron2's built-in metadata: names and flip map
K5 = "petr_test_metadata_k5"
MetadataCatalog.get(K5).set(
    keypoint_names=["nose", "l_hand", "r_hand", "l_foot", "r_foot"],
    keypoint_flip_map=[("l_hand", "r_hand"), ("r_foot", "l_foot")],
    keypoint_oks_sigmas=[0.03, 0.06, 0.06, 0.09, 0.09],
)
NO_FLIP = "petr_test_metadata_no_flip"
NO_FLIP_META = MetadataCatalog.get(NO_FLIP).set(keypoint_names=["a", "b"])


def test_coco_spec_matches_detectron2():
    meta = MetadataCatalog.get(COCO)
    spec = KeypointSpec.from_metadata(meta)
    assert spec.num_keypoints == 17 and spec.names == tuple(meta.keypoint_names)
    assert list(spec.flip_indices) == utils.create_keypoint_hflip_indices([COCO])
    assert list(spec.oks_sigmas) == COCO_OKS_SIGMAS
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_keypoints = 14


def test_flip_indices_swap_both_ways_and_keep_the_rest():
    spec = KeypointSpec.from_metadata(MetadataCatalog.get(K5))
    assert spec.flip_indices == (0, 2, 1, 4, 3)
    assert spec.oks_sigmas == (0.03, 0.06, 0.06, 0.09, 0.09)


def test_sigmas_override_metadata_then_defaults_then_none():
    meta, key = MetadataCatalog.get(K5), "MODEL.PETR.OKS_SIGMAS"
    spec = KeypointSpec.from_metadata(meta, oks_sigmas=[0.1] * 5, sigmas_key=key)
    assert spec.oks_sigmas == (0.1,) * 5
    assert list(KeypointSpec.from_metadata(None, default_num_keypoints=14).oks_sigmas) == (
        CROWDPOSE_OKS_SIGMAS
    )
    # K = 2 has no default sigmas: None unless a consumer asks for them by their key
    assert KeypointSpec.from_metadata(MetadataCatalog.get(NO_FLIP)).oks_sigmas is None
    with pytest.raises(ValueError, match=f"2 keypoints.*{NO_FLIP}.*TEST.KEYPOINT_OKS_SIGMAS"):
        KeypointSpec.from_metadata(NO_FLIP_META, sigmas_key="TEST.KEYPOINT_OKS_SIGMAS")
    with pytest.raises(ValueError, match="MODEL.PETR.OKS_SIGMAS gives 4 OKS sigmas for 5"):
        KeypointSpec.from_metadata(meta, oks_sigmas=[0.1] * 4, sigmas_key=key)


def test_number_of_keypoints_needs_names_or_a_default():
    meta = MetadataCatalog.get("petr_test_metadata_empty")
    assert KeypointSpec.from_metadata(meta, default_num_keypoints=17).names == ()
    with pytest.raises(ValueError, match="petr_test_metadata_empty.*no keypoint_names"):
        KeypointSpec.from_metadata(meta)


def test_flip_errors_name_the_key_and_the_dataset():
    assert KeypointSpec.from_metadata(MetadataCatalog.get(NO_FLIP)).flip_indices is None
    with pytest.raises(ValueError, match=f"TEST.AUG.FLIP needs.*keypoint_flip_map.*{NO_FLIP}"):
        KeypointSpec.from_metadata(MetadataCatalog.get(NO_FLIP), flip_key="TEST.AUG.FLIP")
    name = "petr_test_metadata_bad_flip"
    MetadataCatalog.get(name).set(keypoint_names=["a", "b"], keypoint_flip_map=[("a", "c")])
    with pytest.raises(ValueError, match=f"keypoint_flip_map of '{name}'.*'c'"):
        KeypointSpec.from_metadata(MetadataCatalog.get(name))


def test_datasets_used_together_must_agree():
    assert keypoint_spec([], default_num_keypoints=14).num_keypoints == 14
    assert keypoint_spec([COCO, "keypoints_coco_2017_train"], flip_key="X").num_keypoints == 17
    # a dataset without keypoint_names counts as the first one's K
    assert keypoint_spec([K5, "petr_test_metadata_empty"]).num_keypoints == 5
    with pytest.raises(ValueError, match=f"'{COCO}' and '{K5}' have 17 vs 5 keypoints"):
        keypoint_spec([COCO, K5])
    other = "petr_test_metadata_k5_other_flip"
    MetadataCatalog.get(other).set(
        keypoint_names=list(MetadataCatalog.get(K5).keypoint_names),
        keypoint_flip_map=[("l_hand", "r_hand")],
    )
    assert keypoint_spec([K5, other]).flip_indices == (0, 2, 1, 4, 3)  # the first one's
    with pytest.raises(ValueError, match=f"'{K5}' and '{other}' differ.*INPUT.PETR.FLIP_PROB"):
        keypoint_spec([K5, other], flip_key="INPUT.PETR.FLIP_PROB")
