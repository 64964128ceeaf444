"""PETR as a Detectron2 meta-architecture.

front door (petr.data.preprocess) -> backbone -> neck -> deformable encoder -> point proposals
-> pose decoder -> criterion.match -> joint decoder -> criterion (training)
 | top-k -> joint decoder (`predict`, the one inference path) -> back door (`postprocess`).
Inference needs no training code: the model holds its own `KeypointSpec` and a model built
without its criterion (`criterion=None`) predicts the same.
Follows the official implementation (hikvision-research/opera, PETR / PETRHead / PETRTransformer).
"""

import dataclasses
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone

from ..config import inference_autocast_dtype
from ..data.metadata import KeypointSpec, keypoint_spec
from ..data.preprocess import PETRImages, batch_images
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

__all__ = ["PETR"]

JOINT_SCORES = ("heatmap", "none")


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
        criterion: PETRCriterion | None,
        keypoint_spec: KeypointSpec,
        detections_per_image: int,
        pixel_mean,
        pixel_std,
        input_format: str = "RGB",
        size_divisibility: int = 1,
        output_pixel_offset: float = 0.0,
        oks_nms_thresh: float = 0.0,
        joint_scores: str = "heatmap",
        autocast_dtype: torch.dtype | None = None,
    ):
        """autocast_dtype: TEST.AMP's torch.bfloat16 / torch.float16 for `inference`, or None
        (float32)."""
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.position_encoding = position_encoding
        self.encoder = encoder
        self.proposals = proposals
        self.pose_decoder = pose_decoder
        self.joint_decoder = joint_decoder
        self.heatmap_head = heatmap_head
        self.criterion = criterion  # None: an inference-only model
        self.keypoint_spec = keypoint_spec
        self.detections_per_image = detections_per_image
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.output_pixel_offset = output_pixel_offset
        # Optional test-time OKS-NMS (off in the official model), with the spec's sigmas.
        if not 0.0 <= oks_nms_thresh <= 1.0:
            raise ValueError(
                f"MODEL.PETR.OKS_NMS_THRESH_TEST must be in [0, 1], got {oks_nms_thresh}"
            )
        if oks_nms_thresh > 0 and keypoint_spec.oks_sigmas is None:
            raise ValueError("MODEL.PETR.OKS_NMS_THRESH_TEST > 0 needs OKS sigmas in the spec")
        self.oks_nms_thresh = oks_nms_thresh
        if joint_scores not in JOINT_SCORES:
            raise ValueError(
                f"MODEL.PETR.JOINT_SCORES must be one of {JOINT_SCORES}, got {joint_scores!r}"
            )
        self.joint_scores = joint_scores
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, bfloat16 or float16: {autocast_dtype}")
        self.autocast_dtype = autocast_dtype
        sigmas = torch.tensor(keypoint_spec.oks_sigmas or (), dtype=torch.float32)
        self.register_buffer("oks_sigmas", sigmas, False)
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
            "keypoint_spec": spec,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "size_divisibility": p.SIZE_DIVISIBILITY,
            "output_pixel_offset": p.OUTPUT_PIXEL_OFFSET,
            "oks_nms_thresh": p.OKS_NMS_THRESH_TEST,
            "joint_scores": p.JOINT_SCORES,
            "autocast_dtype": inference_autocast_dtype(cfg),
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def num_keypoints(self) -> int:
        return self.keypoint_spec.num_keypoints

    def preprocess_image(self, batched_inputs: List[Dict]) -> PETRImages:
        """The device half of the front door (`petr.data.preprocess.batch_images`): normalise,
        zero-pad bottom/right (the official collate), sizes and padding mask."""
        images = [x["image"] for x in batched_inputs]
        return batch_images(images, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def encode(self, images: PETRImages):
        """Backbone, neck and deformable encoder. Returns the EncoderMemory."""
        mask = images.padding_mask  # (B, H, W), True = padding
        features = self.neck(self.backbone(images.tensor))
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool() for f in features]
        pos = [self.position_encoding(m).to(f.dtype) for f, m in zip(features, masks)]
        return self.encoder(features, masks, pos)

    def forward(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """batched_inputs: Detectron2 dicts with "image" (C, H, W) in INPUT.FORMAT and, for
        training, "instances" with gt_keypoints (pixels of that image), gt_areas and gt_boxes.
        Training returns a dict of weighted losses; inference a list of {"instances": ...}, or
        with do_postprocess=False (TTA) the `PETRPredictions` and the unpadded input sizes
        they are normalised by."""
        if not self.training:
            return self.inference(batched_inputs, do_postprocess)
        if self.criterion is None:
            raise RuntimeError("This PETR was built for inference only (criterion=None)")
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

    def predict(self, images: PETRImages) -> PETRPredictions:
        """The one inference path (forward, TTA, ONNX export): encoder,
        proposals, pose decoder, the top min(detections_per_image, Q) poses by score, refined
        by the joint decoder, and with MODEL.PETR.JOINT_SCORES "heatmap" each joint's confidence
        from the heatmap branch. Keypoints stay normalised by each unpadded image size; see
        `postprocess` for pixels. No host sync, static shapes (torch.compile, ONNX)."""
        enc = self.encode(images)
        prop = self.proposals(enc)
        _, logits, kpts = self.pose_decoder(enc, prop["reference_points"])
        B, Q, _ = logits[-1].shape
        k = min(self.detections_per_image, Q)
        scores, idx = logits[-1][..., 0].sigmoid().topk(k, dim=1)  # (B, k), sorted
        top = torch.gather(kpts[-1], 1, idx[..., None].expand(-1, -1, kpts.shape[-1]))
        refined = self.joint_decoder(enc, top.flatten(0, 1))[-1]  # (B*k, K, 2), k per image
        keypoints = refined.view(B, k, self.num_keypoints, 2)
        joint_scores = None
        if self.joint_scores == "heatmap":
            joint_scores = self.heatmap_head.joint_scores(enc, keypoints)  # (B, k, K)
        return PETRPredictions(scores, keypoints, joint_scores)

    def predict_autocast(self, images: PETRImages) -> PETRPredictions:
        """`predict` under torch.autocast(self.autocast_dtype) on the model's device (TEST.AMP),
        with float32 results; plain `predict` when autocast_dtype is None. Every route through
        `forward` (--eval-only, predictor, TTA, benchmark) comes here; the ONNX export calls
        `predict` itself and stays float32."""
        if self.autocast_dtype is None:
            return self.predict(images)
        device_type = self.device.type
        if self.autocast_dtype == torch.float16 and device_type != "cuda":
            raise ValueError(
                f"TEST.AMP.DTYPE=float16 needs CUDA, but the model is on {device_type}: "
                "use TEST.AMP.DTYPE bfloat16"
            )
        with torch.autocast(device_type, dtype=self.autocast_dtype):
            predictions = self.predict(images)
        return dataclasses.replace(
            predictions,
            **{
                f.name: getattr(predictions, f.name).float()
                for f in dataclasses.fields(predictions)
                if torch.is_tensor(getattr(predictions, f.name))
                and getattr(predictions, f.name).is_floating_point()
            },
        )

    def postprocess(self, predictions: PETRPredictions, batched_inputs, image_sizes):
        """The back door: `PETRPredictions` (keypoints normalised by `image_sizes`, the unpadded
        network input size (h, w) of each image) -> [{"instances": Instances}] in pixels of each
        original image (the input dict's "height"/"width", else image_sizes), with the joint
        scores (if any) in pred_keypoints[..., 2], OKS-NMS'ed when
        MODEL.PETR.OKS_NMS_THRESH_TEST > 0. Forward and TTA (after merging its views) both end
        here."""
        results = []
        joint_scores = predictions.joint_scores
        for b, (x, size) in enumerate(zip(batched_inputs, image_sizes)):
            out_size = (x.get("height", size[0]), x.get("width", size[1]))
            inst = poses_to_instances(
                predictions.keypoints[b], predictions.scores[b], size, out_size,
                self.output_pixel_offset, None if joint_scores is None else joint_scores[b],
            )  # fmt: skip
            if self.oks_nms_thresh > 0:
                keep = oks_nms(
                    inst.pred_keypoints, inst.scores, self.oks_sigmas, self.oks_nms_thresh
                )
                inst = inst[keep]
            results.append({"instances": inst})
        return results

    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """Front door -> predict (under TEST.AMP's autocast) -> back door (see `forward`)."""
        images = self.preprocess_image(batched_inputs)
        predictions = self.predict_autocast(images)
        if not do_postprocess:
            return predictions, images.image_sizes
        return self.postprocess(predictions, batched_inputs, images.image_sizes)
