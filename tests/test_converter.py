"""The official-checkpoint converter (petr.checkpoint.opera_converter and its tool).

Synthetic checkpoints carry the exact names, shapes and dtypes of the four official releases
(tests/data/opera_state_dicts/, copies of shared/reference); each source tensor is filled with
its own constant so that the provenance of every converted tensor can be read back. Converted
dicts are compared with the state dict of the model each shipped config builds (on the meta
device: full size without allocating 200M parameters), and the real small official checkpoint
(opera_tiny) is converted and loaded into a CPU model through Detectron2's checkpointer.
"""

import importlib.util
import os
import sys
import types

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from petr_testing import OPERA_STATE_DICTS, OPERA_TINY, REPO_ROOT, load_cfg

from petr.checkpoint.opera_converter import (
    AUTHOR,
    OperaCheckpointError,
    convert_opera_checkpoint,
    convert_state_dict,
    load_opera_state_dict,
)
from petr.checkpoint.opera_layout import ResNetLayout, SwinLayout, infer_layout, matching_config
from petr.modeling.backbone.swin import relative_position_index

TSV = {
    "r50-coco": "petr_R50.yaml",
    "r101-coco": "petr_R101.yaml",
    "swinl-coco": "petr_SwinL.yaml",
    "swinl-crowdpose": "petr_SwinL_crowdpose.yaml",
}
T = "bbox_head.transformer."


def _tsv_path(name):
    return os.path.join(OPERA_STATE_DICTS, f"opera-state-dict-{name}.tsv")


def _synthetic(name):
    """Official names/shapes/dtypes; float tensor i holds the constant i + 1 (an expanded
    scalar: no memory for 220M parameters)."""
    sd = {}
    with open(_tsv_path(name)) as f:
        for i, line in enumerate(f):
            key, shape, dtype = line.rstrip("\n").split("\t")
            shape = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
            if dtype == "int64":
                # relative_position_index (checked against the standard one) or BN counters
                idx = "relative_position_index" in key
                sd[key] = relative_position_index(7) if idx else torch.tensor(i, dtype=torch.int64)
            else:
                assert dtype == "float32", (key, dtype)
                sd[key] = torch.tensor(float(i + 1)).expand(shape)
    return sd


def _const(t):
    """The constant a synthetic tensor holds (read without copying an expanded tensor)."""
    return float(t[(0,) * t.dim()])


def _tiny_path():
    return os.path.join(OPERA_TINY, "opera_tiny_petr.pth")


def _meta_model(config):
    cfg = load_cfg(config)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        return build_model(cfg)


# Hand-written (official, ours) pairs for every kind of rule, from the converter's specification.
COMMON_PAIRS = [
    ("neck.convs.2.conv.weight", "neck.convs.2.weight"),
    ("neck.convs.0.gn.bias", "neck.convs.0.norm.bias"),
    ("neck.extra_convs.0.conv.weight", "neck.extra_convs.0.weight"),
    (T + "level_embeds", "encoder.level_embed"),
    (T + "encoder.layers.5.attentions.0.sampling_offsets.bias",
     "encoder.layers.5.self_attn.sampling_offsets.bias"),
    (T + "encoder.layers.0.norms.0.weight", "encoder.layers.0.norm1.weight"),
    (T + "encoder.layers.0.norms.1.weight", "encoder.layers.0.norm2.weight"),
    (T + "encoder.layers.2.ffns.0.layers.0.0.weight", "encoder.layers.2.linear1.weight"),
    (T + "encoder.layers.2.ffns.0.layers.1.bias", "encoder.layers.2.linear2.bias"),
    (T + "enc_output.weight", "proposals.output_proj.weight"),
    (T + "enc_output_norm.bias", "proposals.output_norm.bias"),
    ("bbox_head.query_embedding.weight", "pose_decoder.query_embed.weight"),
    (T + "decoder.layers.1.attentions.0.attn.in_proj_weight",
     "pose_decoder.layers.1.self_attn.in_proj_weight"),
    (T + "decoder.layers.1.attentions.0.attn.out_proj.bias",
     "pose_decoder.layers.1.self_attn.out_proj.bias"),
    (T + "decoder.layers.2.attentions.1.attention_weights.weight",
     "pose_decoder.layers.2.cross_attn.attention_weights.weight"),
    (T + "decoder.layers.0.norms.0.bias", "pose_decoder.layers.0.norm1.bias"),
    (T + "decoder.layers.0.norms.1.bias", "pose_decoder.layers.0.norm2.bias"),
    (T + "decoder.layers.0.norms.2.bias", "pose_decoder.layers.0.norm3.bias"),
    ("bbox_head.cls_branches.0.weight", "pose_decoder.class_heads.0.weight"),
    ("bbox_head.kpt_branches.2.6.weight", "pose_decoder.kpt_heads.2.6.weight"),
    (T + "refine_query_embedding.weight", "joint_decoder.query_embed.weight"),
    (T + "refine_decoder.layers.1.attentions.1.sampling_offsets.weight",
     "joint_decoder.layers.1.cross_attn.sampling_offsets.weight"),
    (T + "refine_decoder.layers.0.norms.2.weight", "joint_decoder.layers.0.norm3.weight"),
    ("bbox_head.refine_kpt_branches.1.4.weight", "joint_decoder.kpt_heads.1.4.weight"),
    (T + "hm_encoder.layers.0.attentions.0.value_proj.weight",
     "heatmap_head.layers.0.self_attn.value_proj.weight"),
    (T + "hm_encoder.layers.0.norms.1.bias", "heatmap_head.layers.0.norm2.bias"),
    ("bbox_head.fc_hm.weight", "heatmap_head.predictor.weight"),
]  # fmt: skip
RESNET_PAIRS = [
    ("backbone.conv1.weight", "backbone.stem.conv1.weight"),
    ("backbone.bn1.running_var", "backbone.stem.conv1.norm.running_var"),
    ("backbone.layer1.0.downsample.0.weight", "backbone.res2.0.shortcut.weight"),
    ("backbone.layer4.0.downsample.1.running_mean", "backbone.res5.0.shortcut.norm.running_mean"),
    ("backbone.layer3.5.conv2.weight", "backbone.res4.5.conv2.weight"),
    ("backbone.layer2.3.bn3.bias", "backbone.res3.3.conv3.norm.bias"),
]
SWIN_PAIRS = [
    ("backbone.patch_embed.projection.weight", "backbone.patch_embed.proj.weight"),
    ("backbone.stages.2.blocks.17.attn.w_msa.qkv.weight",
     "backbone.layers.2.blocks.17.attn.qkv.weight"),
    ("backbone.stages.3.blocks.1.ffn.layers.1.bias", "backbone.layers.3.blocks.1.mlp.fc2.bias"),
    ("backbone.norm3.weight", "backbone.norm3.weight"),
]  # fmt: skip
# The proposal branches sit after the pose-decoder ones: index 3 for COCO, 6 for CrowdPose.
ENC_BRANCH = {"r50-coco": 3, "r101-coco": 3, "swinl-coco": 3, "swinl-crowdpose": 6}


@pytest.mark.parametrize("name", list(TSV))
def test_official_layout_converts_to_the_model_of_its_config(name):
    src = _synthetic(name)
    out, report = convert_state_dict(src)
    assert matching_config(report.layout) == f"configs/{TSV[name]}"
    # The printed overrides exist and agree with the shipped config.
    cfg = load_cfg(TSV[name])
    before = cfg.dump()
    cfg.merge_from_list(report.layout.config_opts())
    assert cfg.dump() == before

    model = _meta_model(TSV[name])
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in out.items()}
    assert sorted(want.keys() - got.keys()) == []  # missing
    assert sorted(got.keys() - want.keys()) == []  # unexpected
    assert got == want
    incompatible = model.load_state_dict(out, strict=True, assign=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    # Every float source tensor lands in exactly one output tensor (its constant), BN counters
    # are the only tensors dropped, and every output tensor is float32.
    counters = [k for k in src if k.endswith("num_batches_tracked")]
    assert report.dropped == counters
    assert len(out) == len(src) - len(counters)
    ids = sorted(_const(v) for v in out.values() if v.is_floating_point())
    want_ids = sorted(_const(v) for v in src.values() if v.is_floating_point())
    assert ids == want_ids
    assert all(v.dtype == torch.float32 for v in out.values() if v.is_floating_point())

    e = ENC_BRANCH[name]
    pairs = COMMON_PAIRS + (SWIN_PAIRS if "swin" in name else RESNET_PAIRS) + [
        (f"bbox_head.cls_branches.{e}.bias", "proposals.class_head.bias"),
        (f"bbox_head.kpt_branches.{e}.6.weight", "proposals.kpt_head.6.weight"),
        (f"bbox_head.kpt_branches.{e}.0.bias", "proposals.kpt_head.0.bias"),
        (f"bbox_head.kpt_branches.{e - 1}.4.bias", f"pose_decoder.kpt_heads.{e - 1}.4.bias"),
    ]  # fmt: skip
    params = dict(model.state_dict())  # assign=True: the loaded tensors themselves
    for official, ours in pairs:
        assert torch.equal(params[ours], src[official]), (official, ours)


def test_layout_names_the_architecture():
    r101 = infer_layout(_synthetic("r101-coco")).backbone
    assert r101 == ResNetLayout(101, (3, 4, 23, 3), 64, 256, 1, 64)
    layout = infer_layout(_synthetic("swinl-crowdpose"))
    assert layout.backbone == SwinLayout(192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 4, 4.0)
    assert (layout.num_keypoints, layout.pose_dec_layers, layout.joint_dec_layers) == (14, 6, 3)
    assert (layout.num_heads, layout.enc_points, layout.joint_points) == (8, 4, 4)


def test_swin_patch_merging_is_reordered_not_copied():
    src = _synthetic("swinl-coco")
    key = "backbone.stages.0.downsample.reduction.weight"  # (384, 4*192) mmdet unfold order
    src[key] = torch.randn(src[key].shape)
    out, _ = convert_state_dict(src)
    got = out["backbone.layers.0.downsample.reduction.weight"]
    # mmdet column c*4 + p holds neighbour p of channel c; ours is block q*C + c with the
    # (0,0), (1,0), (0,1), (1,1) order, i.e. p = [0, 2, 1, 3][q].
    c = 192
    for q, p in enumerate([0, 2, 1, 3]):
        assert torch.equal(got[:, q * c : (q + 1) * c], src[key][:, p::4])


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory):
    src_path = _tiny_path()
    dst = str(tmp_path_factory.mktemp("conv") / "tiny_d2.pth")
    report = convert_opera_checkpoint(src_path, dst)
    return src_path, dst, report


def test_real_official_checkpoint_loads_through_detectron2(tiny_converted):
    src_path, dst, report = tiny_converted
    assert report.num_source == 549
    assert len(report.dropped) == 53 and sum(report.groups.values()) == 496
    saved = torch.load(dst, map_location="cpu", weights_only=True)
    assert saved["__author__"] == AUTHOR and saved["matching_heuristics"] is False

    # The overrides the converter prints must build the matching model from the base config.
    cfg = load_cfg("Base-PETR.yaml")
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    cfg.merge_from_list(report.layout.config_opts())
    cfg.TEST.DETECTIONS_PER_IMAGE = 10  # the fixture's test setting, not a weight
    model = build_model(cfg)
    DetectionCheckpointer(model).load(dst)
    sd = model.state_dict()
    # Same names, and every model tensor now holds the saved value: nothing missing/unexpected.
    assert set(sd) == set(saved["model"])
    assert all(torch.equal(sd[k], saved["model"][k]) for k in sd)
    official = load_opera_state_dict(src_path)
    for a, b in [
        ("backbone.layer3.4.bn2.running_var", "backbone.res4.4.conv2.norm.running_var"),
        (T + "decoder.layers.2.attentions.1.sampling_offsets.weight",
         "pose_decoder.layers.2.cross_attn.sampling_offsets.weight"),
        ("bbox_head.kpt_branches.3.6.bias", "proposals.kpt_head.6.bias"),
        ("bbox_head.query_embedding.weight", "pose_decoder.query_embed.weight"),
        ("bbox_head.refine_kpt_branches.0.2.weight", "joint_decoder.kpt_heads.0.2.weight"),
    ]:  # fmt: skip
        assert torch.equal(sd[b], official[a]), (a, b)

    # End to end: the converted weights reproduce the official outputs on the fixture's image
    # (README: faithful to ~1e-5 in score, ~1e-3 px; looser than 0.01 px is a real difference).
    io = torch.load(os.path.join(os.path.dirname(src_path), "opera_tiny_io.pt"), weights_only=True)
    model.eval()
    with torch.no_grad():
        inst = model([{"image": io["image_rgb"].permute(2, 0, 1)}])[0]["instances"]
    assert len(inst) == len(io["scores"])
    torch.testing.assert_close(inst.scores, io["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(inst.pred_keypoints[..., :2], io["keypoints"], rtol=0, atol=1e-2)
    torch.testing.assert_close(inst.pred_boxes.tensor, io["boxes"], rtol=0, atol=1e-2)


def test_dry_run_and_cli(tiny_converted, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_opera_checkpoint", os.path.join(REPO_ROOT, "tools", "convert_opera_checkpoint.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src_path, dst, _ = tiny_converted
    assert tool.main(["--dry-run", src_path]) == 0
    text = capsys.readouterr().out
    assert "ResNet-50" in text and "hidden 64" in text and "MODEL.PETR.ENC_LAYERS 2" in text
    assert "Matching config: none" in text
    assert "Converted" not in text and list(tmp_path.iterdir()) == []
    assert tool.main([src_path, str(tmp_path / "out.pth")]) == 0
    text = capsys.readouterr().out
    assert "dropped        53" in text and (tmp_path / "out.pth").is_file()
    assert tool.main([dst, str(tmp_path / "again.pth")]) == 1  # our own output: refused
    assert "already converted" in capsys.readouterr().err


def test_reconversion_is_refused(tiny_converted, tmp_path):
    _, dst, _ = tiny_converted
    with pytest.raises(OperaCheckpointError, match=r"tiny_d2\.pth: already converted"):
        convert_opera_checkpoint(dst, str(tmp_path / "x.pth"))
    raw = tmp_path / "raw.pth"  # our names without the author tag
    torch.save(torch.load(dst, weights_only=True)["model"], raw)
    with pytest.raises(OperaCheckpointError, match="already in this project's layout"):
        convert_opera_checkpoint(str(raw), str(tmp_path / "y.pth"))


def test_wrappers_prefix_and_half_precision(tmp_path):
    src = _synthetic("r50-coco")
    ref, _ = convert_state_dict(src)
    half = {
        "module." + k: torch.tensor(_const(v), dtype=torch.half).expand(v.shape)
        if v.is_floating_point() else v
        for k, v in src.items()
    }  # fmt: skip
    path = tmp_path / "ddp.pth"
    torch.save({"model": half}, path)
    out, _ = convert_state_dict(load_opera_state_dict(str(path)))
    assert out.keys() == ref.keys()
    for k, v in out.items():  # the constants (< 2048) survive fp16 exactly
        assert v.dtype == ref[k].dtype and v.shape == ref[k].shape and _const(v) == _const(ref[k])
    assert out["encoder.level_embed"].dtype == torch.float32


def test_unknown_key_is_named():
    src = _synthetic("r50-coco")
    src[T + "decoder.layers.0.attentions.1.reference_points.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.attentions\.1\.reference_points"):
        convert_state_dict(src)
    src = _synthetic("r50-coco")
    src["bbox_head.kpt_branches.0.8.weight"] = torch.zeros(2)  # a 5th Linear in the kpt MLP
    with pytest.raises(ValueError, match=r"'bbox_head\.kpt_branches\.0\.8\.weight'"):
        convert_state_dict(src)


def test_wrong_shape_names_key_and_shapes():
    src = _synthetic("r50-coco")
    key = T + "encoder.layers.3.ffns.0.layers.1.weight"
    src[key] = torch.zeros(256, 1000)
    with pytest.raises(ValueError, match=r"encoder\.layers\.3\.ffns.*\(256, 1000\).*\(256, 1024\)"):
        convert_state_dict(src)
    src = _synthetic("swinl-coco")
    key = "backbone.stages.1.blocks.0.attn.w_msa.proj.weight"
    src[key] = torch.zeros(384, 383)
    with pytest.raises(ValueError, match=r"stages\.1\.blocks\.0\.attn\.w_msa\.proj\.weight.*383"):
        convert_state_dict(src)


def test_missing_tensor_and_extra_layer_are_named():
    src = _synthetic("r50-coco")
    del src[T + "decoder.layers.1.norms.2.bias"]
    with pytest.raises(ValueError, match=r"pose_decoder\.layers\.1\.norm3\.bias"):
        convert_state_dict(src)
    src = _synthetic("r50-coco")
    src["bbox_head.cls_branches.4.weight"] = torch.zeros(1, 256)  # COCO has branches 0..3
    with pytest.raises(ValueError, match=r"cls_branches\.4\.weight.*class_heads\.4"):
        convert_state_dict(src)


def test_unknown_backbone_is_named():
    src = {k: v for k, v in _synthetic("r50-coco").items() if not k.startswith("backbone.")}
    src["backbone.features.0.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"unknown backbone.*backbone\.features\.0\.weight"):
        convert_state_dict(src)


def test_unreadable_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.pth"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (garbage, truncated):
        with pytest.raises(OperaCheckpointError, match=f"{path.name}: not a readable"):
            load_opera_state_dict(str(path))
    with pytest.raises(OperaCheckpointError, match="missing.pth: no such checkpoint file"):
        load_opera_state_dict(str(tmp_path / "missing.pth"))
    not_sd = tmp_path / "list.pth"
    torch.save({"state_dict": {"a": [1, 2]}}, not_sd)
    with pytest.raises(OperaCheckpointError, match=r"list\.pth: entry 'a' is a list"):
        load_opera_state_dict(str(not_sd))


def test_meta_with_classes_that_are_not_installed(tmp_path):
    # Official files pickle mmcv objects in `meta`; without mmcv they must still convert.
    fake = types.ModuleType("mmcv_not_installed")

    class ConfigDict(dict):
        pass

    ConfigDict.__module__, ConfigDict.__qualname__ = fake.__name__, "ConfigDict"
    fake.ConfigDict = ConfigDict
    sys.modules[fake.__name__] = fake
    path = tmp_path / "with_meta.pth"
    try:
        torch.save({"meta": {"config": ConfigDict(lr=1)}, "state_dict": {"x": torch.ones(2)}}, path)
    finally:
        del sys.modules[fake.__name__]
    assert torch.equal(load_opera_state_dict(str(path))["x"], torch.ones(2))
