"""The recipe lives in YAML: add_petr_config adds new keys only; removed keys name their
replacement; coupled keys are derived."""

import os

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from petr_testing import CONFIGS, load_cfg, shrink_cfg

from petr import add_petr_config, get_petr_cfg

# The official recipe's values of Detectron2's own keys (opera-petr-spec: multi-scale training
# with short sides 400-1400, the 384-600 crop policy, the 800/1000/1200 flip test, and no
# Detectron2 image filter, since the official rule keeps crowd-only images). add_petr_config
# adds new keys only, so these live in Base-PETR.yaml.
OFFICIAL_DETECTRON2_VALUES = {
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": False,
    "INPUT.MIN_SIZE_TRAIN": (400, 1400),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "range",
    "INPUT.MAX_SIZE_TRAIN": 1400,
    "INPUT.CROP.ENABLED": True,
    "INPUT.CROP.TYPE": "absolute_range",
    "INPUT.CROP.SIZE": [384, 600],
    "TEST.AUG.MIN_SIZES": (800, 1000, 1200),
    "TEST.AUG.MAX_SIZE": 2000,
    "TEST.AUG.FLIP": True,
}


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_add_petr_config_keeps_every_detectron2_default():
    d2 = _flat(get_cfg())
    cfg = get_cfg()
    add_petr_config(cfg)
    petr = _flat(cfg)
    assert {k: petr[k] for k in d2} == d2
    assert "MODEL.PETR.NUM_QUERIES" in petr and "TEST.AUG.MERGE" in petr


def test_base_yaml_sets_the_official_values_of_detectron2_keys():
    cfg = _flat(get_petr_cfg(os.path.join(CONFIGS, "Base-PETR.yaml")))
    assert {k: cfg[k] for k in OFFICIAL_DETECTRON2_VALUES} == OFFICIAL_DETECTRON2_VALUES


@pytest.mark.parametrize(
    "old, new",
    [
        ("MODEL.PETR.NUM_PROPOSALS", "MODEL.PETR.NUM_QUERIES"),
        ("MODEL.PETR.DETECTIONS_PER_IMAGE", "TEST.DETECTIONS_PER_IMAGE"),
    ],
)
def test_removed_keys_name_their_replacement(tmp_path, old, new):
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        get_petr_cfg(opts=[old, "10"])
    *parents, leaf = old.split(".")
    text = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents))
    yaml = tmp_path / "old.yaml"
    yaml.write_text(f'_BASE_: "{os.path.join(CONFIGS, "Base-PETR.yaml")}"\n{text}'
                    f"{'  ' * len(parents)}{leaf}: 10\n")  # fmt: skip
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        get_petr_cfg(str(yaml))


def test_proposals_follow_the_queries_and_detections_come_from_test():
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    cfg.MODEL.PETR.NUM_QUERIES, cfg.TEST.DETECTIONS_PER_IMAGE = 7, 3
    model = build_model(cfg)
    assert model.proposals.num_proposals == model.pose_decoder.query_embed.num_embeddings == 7
    assert model.detections_per_image == 3


def test_in_features_the_backbone_lacks_are_an_error():
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    cfg.MODEL.PETR.IN_FEATURES = ["res2", "res4", "res5"]
    with pytest.raises(ValueError, match=r"IN_FEATURES.*no \['res2'\].*OUT_FEATURES"):
        build_model(cfg)


def test_device_is_never_switched_silently():
    assert get_petr_cfg().MODEL.DEVICE == "cuda"  # Detectron2's default, checked when built
    assert get_petr_cfg(opts=["MODEL.DEVICE", "cpu"]).MODEL.DEVICE == "cpu"
