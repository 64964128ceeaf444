"""PETR as a Detectron2 meta-architecture.

preprocess -> backbone -> neck -> deformable encoder -> point proposals -> pose decoder
-> criterion.match -> joint decoder -> criterion (training)
 | top-k -> joint decoder (`predict`, the one inference path) -> postprocess (inference).
Follows the official implementation (hikvision-research/opera, PETR / PETRHead / PETRTransformer).
"""

import functools
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList

from ..data.metadata import keypoint_spec
from .backbone.channel_mapper import PETRChannelMapper
from .criterion import PETRCriterion
from .matcher import PETRHungarianMatcher
from .postprocess import oks_nms, poses_to_instances
from .structures import PETROutputs, PETRPredictions, PoseTargets
from .transformer.encoder import PETRTransformerEncoder
from .transformer.heatmap import PETRHeatmapHead
from .transformer.joint_decoder import PETRJointDecoder
from .transformer.pose_decoder import PETRPoseDecoder
from .transformer.position_encoding import PETRSinePositionEncoding
from .transformer.proposals import PETRPointProposals

__all__ = ["PETR", "padding_mask"]


def padding_mask(batch: torch.Tensor, image_sizes) -> torch.Tensor:
    """(B, H, W) bool, True on the padding of a (B, C, H, W) batch padded bottom/right.

    image_sizes: B (h, w) pairs of ints, or a (B, 2) int64 tensor (compared in-graph, for an
    exported model whose batch and sizes are inputs)."""
    B, _, H, W = batch.shape
    if isinstance(image_sizes, torch.Tensor):
        sizes = image_sizes.to(batch.device)
        rows = torch.arange(H, device=batch.device)[None, :, None] >= sizes[:, 0, None, None]
        cols = torch.arange(W, device=batch.device)[None, None, :] >= sizes[:, 1, None, None]
        return rows | cols
    mask = torch.ones((B, H, W), dtype=torch.bool, device=batch.device)
    for i, (h, w) in enumerate(image_sizes):
        mask[i, :h, :w] = False
    return mask


@META_ARCH_REGISTRY.register()
class PETR(nn.Module):
    """End-to-end multi-person pose estimation with transformers (Shi et al., CVPR 2022)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: PETRChannelMapper,
        position_encoding: nn.Module,
        encoder: PETRTransformerEncoder,
        proposals: PETRPointProposals,
        pose_decoder: PETRPoseDecoder,
        joint_decoder: PETRJointDecoder,
        heatmap_head: PETRHeatmapHead,
        criterion: PETRCriterion,
        num_keypoints: int,
        detections_per_image: int,
        pixel_mean,
        pixel_std,
        input_format: str = "RGB",
        size_divisibility: int = 1,
        output_pixel_offset: float = 0.0,
        oks_nms_thresh: float = 0.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.position_encoding = position_encoding
        self.encoder = encoder
        self.proposals = proposals
        self.pose_decoder = pose_decoder
        self.joint_decoder = joint_decoder
        self.heatmap_head = heatmap_head
        self.criterion = criterion
        self.num_keypoints = num_keypoints
        self.detections_per_image = detections_per_image
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.output_pixel_offset = output_pixel_offset
        # Optional test-time OKS-NMS (off in the official model), with the criterion's sigmas.
        if not 0.0 <= oks_nms_thresh <= 1.0:
            raise ValueError(
                f"MODEL.PETR.OKS_NMS_THRESH_TEST must be in [0, 1], got {oks_nms_thresh}"
            )
        self.oks_nms_thresh = oks_nms_thresh
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        p = cfg.MODEL.PETR
        spec = keypoint_spec(
            list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST),
            default_num_keypoints=p.NUM_KEYPOINTS,
            oks_sigmas=p.OKS_SIGMAS,
            sigmas_key="MODEL.PETR.OKS_SIGMAS",
        )
        K, sigmas = spec.num_keypoints, spec.oks_sigmas
        backbone = build_backbone(cfg)
        C, heads, ffn, drop, L = (
            p.HIDDEN_DIM, p.NUM_HEADS, p.DIM_FEEDFORWARD, p.DROPOUT, p.NUM_FEATURE_LEVELS
        )  # fmt: skip
        common = dict(dim=C, num_heads=heads, ffn_dim=ffn, dropout=drop)
        matcher = PETRHungarianMatcher(
            cost_class=p.MATCH_CLS_WEIGHT,
            cost_kpt=p.MATCH_KPT_WEIGHT,
            cost_oks=p.MATCH_OKS_WEIGHT,
            focal_alpha=p.FOCAL_ALPHA,
            focal_gamma=p.FOCAL_GAMMA,
            oks_sigmas=sigmas,
        )
        weights = {
            "cls": p.CLS_WEIGHT, "kpt": p.KPT_WEIGHT, "oks": p.OKS_WEIGHT, "hm": p.HM_WEIGHT,
            "kpt_refine": p.KPT_REFINE_WEIGHT, "oks_refine": p.OKS_REFINE_WEIGHT,
            "cls_enc": p.ENC_CLS_WEIGHT, "kpt_enc": p.ENC_KPT_WEIGHT,
        }  # fmt: skip
        return {
            "backbone": backbone,
            "neck": PETRChannelMapper(backbone.output_shape(), p.IN_FEATURES, C, L),
            "position_encoding": PETRSinePositionEncoding(C // 2, p.POS_TEMPERATURE),
            "encoder": PETRTransformerEncoder(
                **common, num_layers=p.ENC_LAYERS, num_levels=L, num_points=p.ENC_N_POINTS
            ),
            "proposals": PETRPointProposals(
                dim=C,
                num_keypoints=K,
                num_proposals=p.NUM_QUERIES,  # query i <-> proposal i
                kpt_hidden_dim=p.KPT_HEAD_HIDDEN_DIM,
            ),  # fmt: skip
            "pose_decoder": PETRPoseDecoder(
                **common,
                num_layers=p.POSE_DEC_LAYERS,
                num_levels=L,
                num_keypoints=K,
                num_queries=p.NUM_QUERIES,
                kpt_hidden_dim=p.KPT_HEAD_HIDDEN_DIM,
            ),  # fmt: skip
            "joint_decoder": PETRJointDecoder(
                **common,
                num_layers=p.JOINT_DEC_LAYERS,
                num_levels=L,
                num_points=p.JOINT_DEC_N_POINTS,
                num_keypoints=K,
            ),  # fmt: skip
            "heatmap_head": PETRHeatmapHead(
                **common, num_layers=p.HM_ENC_LAYERS, num_points=p.ENC_N_POINTS, num_keypoints=K
            ),
            "criterion": PETRCriterion(
                matcher=matcher,
                num_keypoints=K,
                oks_sigmas=sigmas,
                weights=weights,
                focal_alpha=p.FOCAL_ALPHA,
                focal_gamma=p.FOCAL_GAMMA,
            ),  # fmt: skip
            "num_keypoints": K,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "size_divisibility": p.SIZE_DIVISIBILITY,
            "output_pixel_offset": p.OUTPUT_PIXEL_OFFSET,
            "oks_nms_thresh": p.OKS_NMS_THRESH_TEST,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise each image, then zero-pad the batch bottom/right (the official collate).

        Same result as ImageList.from_tensors(images, size_divisibility, 0.0), but sizes stay
        Python ints (from_tensors turns them into tensors and reads them back, which breaks
        torch.compile's graph)."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]  # fmt: skip
        # No int() and no Python max() on sizes: under torch.compile(dynamic) they are symbolic,
        # and int() would pin them (a graph per size), max() guard on their order.
        sizes = [(im.shape[-2], im.shape[-1]) for im in images]
        d = max(self.size_divisibility, 1)
        H = -(-functools.reduce(torch.sym_max, [h for h, _ in sizes]) // d) * d
        W = -(-functools.reduce(torch.sym_max, [w for _, w in sizes]) // d) * d
        if len(images) == 1 and sizes[0] == (H, W):
            return ImageList(images[0][None], sizes)
        batch = images[0].new_zeros((len(images), images[0].shape[0], H, W))
        for img, (h, w), dst in zip(images, sizes, batch):
            dst[:, :h, :w] = img
        return ImageList(batch, sizes)

    def encode(self, images: ImageList):
        """Backbone, neck and deformable encoder. Returns the EncoderMemory.

        images.image_sizes: B (h, w) pairs of ints (symbolic ones under torch.compile(dynamic)),
        or a (B, 2) int64 tensor (an exported graph's input); no size is read back as an int."""
        mask = padding_mask(images.tensor, images.image_sizes)
        features = self.neck(self.backbone(images.tensor))
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool() for f in features]
        pos = [self.position_encoding(m).to(f.dtype) for f, m in zip(features, masks)]
        return self.encoder(features, masks, pos)

    def forward(self, batched_inputs: List[Dict]):
        """batched_inputs: Detectron2 dicts with "image" (C, H, W) in INPUT.FORMAT and, for
        training, "instances" with gt_keypoints (pixels of that image), gt_areas and gt_boxes.
        Training returns a dict of weighted losses; inference a list of {"instances": ...}."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        enc = self.encode(images)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        return self.losses(enc, targets)

    def prepare_targets(self, batched_inputs, image_sizes) -> List[PoseTargets]:
        targets = []
        for x, size in zip(batched_inputs, image_sizes):
            if "instances" not in x:
                raise KeyError("PETR training needs 'instances' in every input dict")
            inst = x["instances"].to(self.device)
            kpts = inst.gt_keypoints.tensor
            if kpts.shape[1] != self.num_keypoints:
                raise ValueError(
                    f"Image {x.get('file_name', '?')}: gt_keypoints has {kpts.shape[1]} "
                    f"keypoints, the model expects {self.num_keypoints}"
                )
            targets.append(
                PoseTargets(
                    keypoints=kpts,
                    areas=inst.gt_areas.float(),
                    boxes=inst.gt_boxes.tensor,
                    image_size=tuple(size),
                    # the heatmap targets are drawn on the host: keep the loader's copies
                    host_keypoints=x["instances"].gt_keypoints.tensor,
                    host_boxes=x["instances"].gt_boxes.tensor,
                )
            )
        return targets

    def losses(self, enc, targets: List[PoseTargets]) -> Dict[str, torch.Tensor]:
        prop = self.proposals(enc)
        _, logits, kpts = self.pose_decoder(enc, prop["reference_points"])
        outputs = PETROutputs(logits, kpts, prop["enc_logits"], prop["enc_kpts"])
        matches = self.criterion.match(outputs, targets)
        # The joint decoder refines the matched poses of the last layer (detached).
        poses, counts = self.criterion.joint_decoder_inputs(outputs, matches)
        outputs.joint_kpts = self.joint_decoder(enc, poses, counts)
        outputs.hm_logits, outputs.hm_padding_mask = self.heatmap_head(enc)
        return self.criterion(outputs, targets, matches)

    def predict(self, images: ImageList) -> PETRPredictions:
        """The one inference path (forward, TTA through forward, ONNX export): encoder,
        proposals, pose decoder, the top min(detections_per_image, Q) poses by score, refined
        by the joint decoder. Keypoints stay normalised by each unpadded image size; see
        `postprocess` for pixels. No host sync, static shapes (torch.compile, ONNX)."""
        enc = self.encode(images)
        prop = self.proposals(enc)
        _, logits, kpts = self.pose_decoder(enc, prop["reference_points"])
        B, Q, _ = logits[-1].shape
        k = min(self.detections_per_image, Q)
        scores, idx = logits[-1][..., 0].sigmoid().topk(k, dim=1)  # (B, k), sorted
        top = torch.gather(kpts[-1], 1, idx[..., None].expand(-1, -1, kpts.shape[-1]))
        refined = self.joint_decoder(enc, top.flatten(0, 1))[-1]  # (B*k, K, 2), k per image
        return PETRPredictions(scores, refined.view(B, k, self.num_keypoints, 2))

    def postprocess(self, predictions: PETRPredictions, batched_inputs, image_sizes):
        """[{"instances": Instances}] in pixels of each original image (the input dict's
        "height"/"width", else the network input's size), OKS-NMS'ed when enabled."""
        results = []
        for b, (x, size) in enumerate(zip(batched_inputs, image_sizes)):
            out_size = (x.get("height", size[0]), x.get("width", size[1]))
            inst = poses_to_instances(
                predictions.keypoints[b], predictions.scores[b], size, out_size,
                self.output_pixel_offset,
            )  # fmt: skip
            if self.oks_nms_thresh > 0:
                sigmas = self.criterion.oks_sigmas
                inst = inst[oks_nms(inst.pred_keypoints, inst.scores, sigmas, self.oks_nms_thresh)]
            results.append({"instances": inst})
        return results

    def inference(self, batched_inputs: List[Dict]):
        """Top poses by score, refined by the joint decoder, in original-image pixels."""
        images = self.preprocess_image(batched_inputs)
        return self.postprocess(self.predict(images), batched_inputs, images.image_sizes)
