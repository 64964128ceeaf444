"""Name mapping from official PETR (hikvision-research/opera) checkpoints to this project's model.

Two declarative tables, both derived from an inferred `OperaLayout`:
- `rule_table(layout)`: ordered (regex on the official name, target template) pairs; the first
  regex that fully matches wins and its named groups fill the template. Layer sub-mappings are
  written once and composed with each stack's prefix.
- `expected_shapes(layout)`: every tensor name of our model (minus a Swin backbone, which
  `swin_keys` owns) with the shape this layout implies. The converter checks each converted
  tensor against it and reports what is left over.

Every tensor is copied verbatim: official and our layouts agree element for element (attention
offsets are (heads, levels, points, 2) heads-outermost in both; `query_embedding` rows are
[pos | content] in both).
"""

from typing import Dict, List, Tuple

from .opera_layout import OperaLayout, ResNetLayout

__all__ = ["DROPPED", "resnet_rules", "rule_table", "expected_shapes"]

Rule = Tuple[str, str]  # (official-name regex, our-name template)

# BN batch counters: FrozenBN has no such buffer and they carry no weights.
DROPPED = r".*\.num_batches_tracked"

_T = r"bbox_head\.transformer\."
_WB = r"(?P<t>weight|bias)"
_BN = r"(?P<t>weight|bias|running_mean|running_var)"
_MSDA = r"(?P<p>sampling_offsets|attention_weights|value_proj|output_proj)\." + _WB

# torchvision/mmdet bottleneck or basic block -> Detectron2 block, relative to the stage.
_RESNET_BLOCK: List[Rule] = [
    (r"(?P<b>\d+)\.conv(?P<k>[123])\.weight", "{b}.conv{k}.weight"),
    (r"(?P<b>\d+)\.bn(?P<k>[123])\." + _BN, "{b}.conv{k}.norm.{t}"),
    (r"(?P<b>\d+)\.downsample\.0\.weight", "{b}.shortcut.weight"),
    (r"(?P<b>\d+)\.downsample\.1\." + _BN, "{b}.shortcut.norm.{t}"),
]

# mmcv BaseTransformerLayer (self_attn, norm, ffn, norm) -> our encoder layer.
_ENCODER_LAYER: List[Rule] = [
    (r"attentions\.0\." + _MSDA, "self_attn.{p}.{t}"),
    (r"norms\.0\." + _WB, "norm1.{t}"),
    (r"ffns\.0\.layers\.0\.0\." + _WB, "linear1.{t}"),
    (r"ffns\.0\.layers\.1\." + _WB, "linear2.{t}"),
    (r"norms\.1\." + _WB, "norm2.{t}"),
]

# mmcv decoder layer (self_attn, norm, cross_attn, norm, ffn, norm) -> our decoder layer. mmcv's
# MultiheadAttention wraps torch's as `.attn`; ours is the torch module itself.
_DECODER_LAYER: List[Rule] = [
    (
        r"attentions\.0\.attn\.(?P<p>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
        "self_attn.{p}",
    ),
    (r"norms\.0\." + _WB, "norm1.{t}"),
    (r"attentions\.1\." + _MSDA, "cross_attn.{p}.{t}"),
    (r"norms\.1\." + _WB, "norm2.{t}"),
    (r"ffns\.0\.layers\.0\.0\." + _WB, "linear1.{t}"),
    (r"ffns\.0\.layers\.1\." + _WB, "linear2.{t}"),
    (r"norms\.2\." + _WB, "norm3.{t}"),
]


def _compose(prefix: Rule, sub_rules: List[Rule]) -> List[Rule]:
    src, dst = prefix
    return [(src + s, dst + d) for s, d in sub_rules]


def resnet_rules() -> List[Rule]:
    """torchvision / mmdet ResNet names -> Detectron2 ResNet names, both under `backbone.`."""
    rules: List[Rule] = [
        (r"backbone\.conv1\.weight", "backbone.stem.conv1.weight"),
        (r"backbone\.bn1\." + _BN, "backbone.stem.conv1.norm.{t}"),
    ]
    for n in range(1, 5):  # torchvision layerN is Detectron2 res{N+1}
        rules += _compose((rf"backbone\.layer{n}\.", f"backbone.res{n + 1}."), _RESNET_BLOCK)
    return rules


def rule_table(layout: OperaLayout) -> List[Rule]:
    """Ordered rules for every non-dropped official tensor (the Swin backbone excepted)."""
    rules: List[Rule] = []
    if isinstance(layout.backbone, ResNetLayout):
        rules += resnet_rules()
    enc_branch = layout.pose_dec_layers  # the extra last cls/kpt branch serves the proposals
    rules += [
        (r"neck\.(?P<m>convs|extra_convs)\.(?P<i>\d+)\.conv\.weight", "neck.{m}.{i}.weight"),
        (r"neck\.(?P<m>convs|extra_convs)\.(?P<i>\d+)\.gn\." + _WB, "neck.{m}.{i}.norm.{t}"),
        (_T + r"level_embeds", "encoder.level_embed"),
        *_compose((_T + r"encoder\.layers\.(?P<i>\d+)\.", "encoder.layers.{i}."), _ENCODER_LAYER),
        (_T + r"enc_output\." + _WB, "proposals.output_proj.{t}"),
        (_T + r"enc_output_norm\." + _WB, "proposals.output_norm.{t}"),
        (rf"bbox_head\.cls_branches\.{enc_branch}\." + _WB, "proposals.class_head.{t}"),
        (
            rf"bbox_head\.kpt_branches\.{enc_branch}\.(?P<j>[0246])\." + _WB,
            "proposals.kpt_head.{j}.{t}",
        ),
        (r"bbox_head\.query_embedding\.weight", "pose_decoder.query_embed.weight"),
        *_compose(
            (_T + r"decoder\.layers\.(?P<i>\d+)\.", "pose_decoder.layers.{i}."), _DECODER_LAYER
        ),
        (r"bbox_head\.cls_branches\.(?P<i>\d+)\." + _WB, "pose_decoder.class_heads.{i}.{t}"),
        (
            r"bbox_head\.kpt_branches\.(?P<i>\d+)\.(?P<j>[0246])\." + _WB,
            "pose_decoder.kpt_heads.{i}.{j}.{t}",
        ),
        (_T + r"refine_query_embedding\.weight", "joint_decoder.query_embed.weight"),
        *_compose(
            (_T + r"refine_decoder\.layers\.(?P<i>\d+)\.", "joint_decoder.layers.{i}."),
            _DECODER_LAYER,
        ),
        (
            r"bbox_head\.refine_kpt_branches\.(?P<i>\d+)\.(?P<j>[024])\." + _WB,
            "joint_decoder.kpt_heads.{i}.{j}.{t}",
        ),
        *_compose(
            (_T + r"hm_encoder\.layers\.(?P<i>\d+)\.", "heatmap_head.layers.{i}."), _ENCODER_LAYER
        ),
        (r"bbox_head\.fc_hm\." + _WB, "heatmap_head.predictor.{t}"),
    ]
    return rules


Shapes = Dict[str, Tuple[int, ...]]


def _linear(name: str, out: int, inp: int, bias: bool = True) -> Shapes:
    shapes = {f"{name}.weight": (out, inp)}
    if bias:
        shapes[f"{name}.bias"] = (out,)
    return shapes


def _norm(name: str, dim: int, bn: bool = False) -> Shapes:
    fields = ("weight", "bias", "running_mean", "running_var") if bn else ("weight", "bias")
    return {f"{name}.{f}": (dim,) for f in fields}


def _resnet_shapes(b: ResNetLayout) -> Shapes:
    """Detectron2 bottleneck ResNet (stride in the 3x3 conv; shapes do not depend on it)."""
    s: Shapes = {"backbone.stem.conv1.weight": (b.stem_out, 3, 7, 7)}
    s.update(_norm("backbone.stem.conv1.norm", b.stem_out, bn=True))
    cin = b.stem_out
    for i, n_blocks in enumerate(b.blocks):
        out = b.res2_out * 2**i
        mid = b.num_groups * b.width_per_group * 2**i
        for blk in range(n_blocks):
            p = f"backbone.res{i + 2}.{blk}"
            convs = [(mid, cin, 1), (mid, mid // b.num_groups, 3), (out, mid, 1)]
            for k, (out_c, in_c, ks) in enumerate(convs, start=1):
                s[f"{p}.conv{k}.weight"] = (out_c, in_c, ks, ks)
                s.update(_norm(f"{p}.conv{k}.norm", out_c, bn=True))
            if cin != out:  # Detectron2 adds a projection shortcut exactly when channels change
                s[f"{p}.shortcut.weight"] = (out, cin, 1, 1)
                s.update(_norm(f"{p}.shortcut.norm", out, bn=True))
            cin = out
    return s


def _encoder_layer(p: str, c: int, ffn: int, heads: int, levels: int, points: int) -> Shapes:
    s = _msda(f"{p}.self_attn", c, heads, levels, points)
    s.update(_norm(f"{p}.norm1", c))
    s.update(_linear(f"{p}.linear1", ffn, c))
    s.update(_linear(f"{p}.linear2", c, ffn))
    s.update(_norm(f"{p}.norm2", c))
    return s


def _decoder_layer(p: str, c: int, ffn: int, heads: int, levels: int, points: int) -> Shapes:
    s = {f"{p}.self_attn.in_proj_weight": (3 * c, c), f"{p}.self_attn.in_proj_bias": (3 * c,)}
    s.update(_linear(f"{p}.self_attn.out_proj", c, c))
    s.update(_norm(f"{p}.norm1", c))
    s.update(_msda(f"{p}.cross_attn", c, heads, levels, points))
    s.update(_norm(f"{p}.norm2", c))
    s.update(_linear(f"{p}.linear1", ffn, c))
    s.update(_linear(f"{p}.linear2", c, ffn))
    s.update(_norm(f"{p}.norm3", c))
    return s


def _msda(p: str, c: int, heads: int, levels: int, points: int) -> Shapes:
    s = _linear(f"{p}.sampling_offsets", heads * levels * points * 2, c)
    s.update(_linear(f"{p}.attention_weights", heads * levels * points, c))
    s.update(_linear(f"{p}.value_proj", c, c))
    s.update(_linear(f"{p}.output_proj", c, c))
    return s


def _mlp(p: str, dims: List[int]) -> Shapes:
    """Sequential of Linears with ReLUs between them: Linear i sits at index 2*i."""
    s: Shapes = {}
    for i, (inp, out) in enumerate(zip(dims[:-1], dims[1:])):
        s.update(_linear(f"{p}.{2 * i}", out, inp))
    return s


def expected_shapes(layout: OperaLayout) -> Shapes:
    """Our name -> shape for every tensor the layout implies, except a Swin backbone's."""
    lo, c, ffn, h, k = (
        layout,
        layout.hidden_dim,
        layout.dim_feedforward,
        layout.num_heads,
        layout.num_keypoints,
    )
    s: Shapes = _resnet_shapes(lo.backbone) if isinstance(lo.backbone, ResNetLayout) else {}
    neck_in = lo.neck_in_channels
    for i, cin in enumerate(neck_in):
        s[f"neck.convs.{i}.weight"] = (c, cin, 1, 1)
        s.update(_norm(f"neck.convs.{i}.norm", c))
    # The first extra level reads the raw last backbone level, later ones the previous extra.
    for i in range(lo.num_levels - lo.num_neck_convs):
        s[f"neck.extra_convs.{i}.weight"] = (c, neck_in[-1] if i == 0 else c, 3, 3)
        s.update(_norm(f"neck.extra_convs.{i}.norm", c))
    s["encoder.level_embed"] = (lo.num_levels, c)
    for i in range(lo.enc_layers):
        s.update(_encoder_layer(f"encoder.layers.{i}", c, ffn, h, lo.num_levels, lo.enc_points))
    kpt_dims = [c, lo.kpt_hidden_dim, lo.kpt_hidden_dim, lo.kpt_hidden_dim, 2 * k]
    s.update(_linear("proposals.output_proj", c, c))
    s.update(_norm("proposals.output_norm", c))
    s.update(_linear("proposals.class_head", 1, c))  # one class: person
    s.update(_mlp("proposals.kpt_head", kpt_dims))
    s["pose_decoder.query_embed.weight"] = (lo.num_queries, 2 * c)
    for i in range(lo.pose_dec_layers):
        # Pose attention samples one point per keypoint on every level.
        s.update(_decoder_layer(f"pose_decoder.layers.{i}", c, ffn, h, lo.num_levels, k))
        s.update(_linear(f"pose_decoder.class_heads.{i}", 1, c))
        s.update(_mlp(f"pose_decoder.kpt_heads.{i}", kpt_dims))
    s["joint_decoder.query_embed.weight"] = (k, 2 * c)
    joint_dims = [c, c, c, 2]
    for i in range(lo.joint_dec_layers):
        s.update(
            _decoder_layer(f"joint_decoder.layers.{i}", c, ffn, h, lo.num_levels, lo.joint_points)
        )
        s.update(_mlp(f"joint_decoder.kpt_heads.{i}", joint_dims))
    for i in range(lo.hm_enc_layers):  # one level: the stride-8 encoder output
        s.update(_encoder_layer(f"heatmap_head.layers.{i}", c, ffn, h, 1, lo.enc_points))
    s.update(_linear("heatmap_head.predictor", k, c))
    return s
