"""PETR training losses: encoder proposals, every pose-decoder layer, every joint-decoder layer and
the auxiliary keypoint heatmap.

Follows the official implementation (hikvision-research/opera `PETRHead.loss`, `loss_single`,
`loss_single_rpn`, `forward_refine` and `loss_heatmap`) term by term, including its normalisers:
    focal:        sum over all queries / (max(mean_gpus(N_pos), 1) + eps)
    L1:           sum over visible coords / (max(mean_gpus(N_visible_coords), 1) + eps)
    OKS:          sum of -log(max(OKS, 1e-6)) / (max(mean_gpus(N_pos), 1) + eps)
    joint L1/OKS: last pose layer's matched targets; OKS normalised by the N refined instances
    heatmap:      CenterNet focal loss / local number of peaks
Ground-truth people with no visible joint are never matched (see `matcher.py`).
"""

import re
from typing import Sequence

import torch
from torch import Tensor, nn

from .heatmap_target import build_heatmap_targets
from .losses import (
    center_focal_loss,
    masked_l1_sum,
    normaliser,
    oks_loss_sum,
    sigmoid_focal_loss_sum,
)
from .matcher import PETRHungarianMatcher, validate_targets
from .structures import LayerMatch, PETRMatches, PETROutputs, PoseTargets

# Drawn with Python loops on the host: torch.compile runs it eagerly (one graph break).
_host_heatmap_targets = torch.compiler.disable(build_heatmap_targets)

LOSS_WEIGHT_KEYS = ("cls", "kpt", "oks", "hm", "kpt_refine", "oks_refine", "cls_enc", "kpt_enc")


def opera_loss_key(official_key: str) -> str:
    """Our loss key for an official opera loss key, e.g. 'd1.loss_kpt_refine' ->
    'loss_kpt_refine_1', 'enc_loss_cls' -> 'loss_cls_enc', 'd0.loss_cls' -> 'loss_cls_0'."""
    if official_key in ("loss_cls", "loss_kpt", "loss_oks", "loss_hm"):
        return official_key
    match = re.fullmatch(r"enc_loss_(cls|kpt)", official_key)
    if match:
        return f"loss_{match.group(1)}_enc"
    match = re.fullmatch(r"d(\d+)\.loss_(cls|kpt|oks|kpt_refine|oks_refine)", official_key)
    if match:
        return f"loss_{match.group(2)}_{match.group(1)}"
    raise KeyError(f"not an official PETR loss key: {official_key!r}")


# The 16 official keys of the COCO configs (3 pose-decoder, 2 joint-decoder layers) -> ours.
OPERA_LOSS_KEYS = {
    key: opera_loss_key(key)
    for key in (
        ["enc_loss_cls", "enc_loss_kpt", "loss_cls", "loss_kpt", "loss_oks", "loss_hm"]
        + [f"d{i}.loss_{t}" for i in range(2) for t in ("cls", "kpt", "oks")]
        + [f"d{j}.loss_{t}_refine" for j in range(2) for t in ("kpt", "oks")]
    )
}


def match_layer(indices, gts: list[dict], num_kpts: int, device) -> LayerMatch:
    """The matcher's per-image (pred_idx, gt_idx) pairs of one layer as one LayerMatch, with
    the prepared targets `gts` (see `PETRCriterion._prepare_targets`) gathered per pair."""
    batch, preds, gt_ids, rows = [], [], [], {"target": [], "visible": [], "areas": [], "scale": []}
    for b, (pred_idx, gt_idx) in enumerate(indices):
        order = torch.argsort(pred_idx)  # the joint decoder orders instances by query
        pred_idx, gt_idx = pred_idx[order].to(device), gt_idx[order].to(device)
        gt = gts[b]
        batch.append(torch.full_like(pred_idx, b))
        preds.append(pred_idx)
        gt_ids.append(gt_idx)
        rows["target"].append(gt["kpts_norm"][gt_idx])
        rows["visible"].append(gt["visible"][gt_idx])
        rows["areas"].append(gt["areas"][gt_idx])
        rows["scale"].append(gt["scale"].expand(len(gt_idx), -1))
    visible = torch.cat(rows["visible"])
    return LayerMatch(
        batch_idx=torch.cat(batch),
        pred_idx=torch.cat(preds),
        gt_idx=torch.cat(gt_ids),
        target=torch.cat(rows["target"]).reshape(-1, 2 * num_kpts),
        weight=visible.float().repeat_interleave(2, dim=1),
        visible=visible,
        areas=torch.cat(rows["areas"]),
        scale=torch.cat(rows["scale"]),
        counts=tuple(int(p.numel()) for p in preds),  # shapes, not values: no sync
    )


class PETRCriterion(nn.Module):
    """Computes PETR's weighted loss dict from the model outputs (see `forward`)."""

    def __init__(
        self,
        *,
        matcher: PETRHungarianMatcher,
        num_keypoints: int,
        oks_sigmas: Sequence[float],
        weights: dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if len(oks_sigmas) != num_keypoints:
            raise ValueError(f"{len(oks_sigmas)} OKS sigmas for {num_keypoints} keypoints")
        if matcher.num_keypoints != num_keypoints:
            raise ValueError(f"matcher has {matcher.num_keypoints} sigmas, not {num_keypoints}")
        unknown = set(weights) - set(LOSS_WEIGHT_KEYS)
        if unknown:
            raise KeyError(f"unknown loss weights {sorted(unknown)}; known: {LOSS_WEIGHT_KEYS}")
        self.matcher = matcher
        self.num_keypoints = num_keypoints
        self.weights = dict(weights)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        sigmas = torch.tensor(list(oks_sigmas), dtype=torch.float32)
        self.register_buffer("oks_sigmas", sigmas, persistent=False)

    def _weight(self, name: str) -> float:
        if name not in self.weights:
            raise KeyError(f"PETRCriterion produces a {name!r} loss but weights has no {name!r}")
        return self.weights[name]

    def match(self, outputs: PETROutputs, targets: list[PoseTargets]) -> PETRMatches:
        """Every Hungarian match of the batch: the encoder proposals (when present) and each
        pose-decoder layer, one matcher call (one host transfer) each. Shapes: see
        PETROutputs; targets: one PoseTargets per image."""
        pose_logits, pose_kpts = outputs.pose_logits, outputs.pose_kpts
        num_layers, num_images, num_queries = pose_logits.shape[:3]
        expected = (num_layers, num_images, num_queries, 2 * self.num_keypoints)
        if pose_logits.shape[-1] != 1 or pose_kpts.shape != expected:
            raise ValueError(
                f"outputs.pose_logits {tuple(pose_logits.shape)} / pose_kpts "
                f"{tuple(pose_kpts.shape)}: expected (Ld, B, Q, 1) / {expected}"
            )
        validate_targets(targets, num_images, self.num_keypoints)
        gts = self._prepare_targets(targets, pose_kpts.device)
        K = self.num_keypoints

        def match(logits, kpts):
            return match_layer(self.matcher(logits, kpts, targets), gts, K, kpts.device)

        enc = None
        if outputs.enc_logits is not None:
            enc = match(outputs.enc_logits.float(), outputs.enc_kpts.float())
        layers = [match(pose_logits[i].float(), pose_kpts[i].float()) for i in range(num_layers)]
        return PETRMatches(layers, enc)

    @staticmethod
    def joint_decoder_inputs(outputs: PETROutputs, matches: PETRMatches):
        """The poses the joint decoder refines in training: the last pose layer's matched
        predictions, detached, (N, 2K) normalised interleaved in image order, ascending query,
        and the poses per image (Python ints).

        With no positive in the batch, one zero pose on image 0: the joint decoder stays in the
        graph (every parameter gets a gradient) and `forward` multiplies its losses by 0."""
        kpts, match = outputs.pose_kpts[-1], matches.last
        if len(match) == 0:
            counts = [1] + [0] * (kpts.shape[0] - 1)
            return kpts.new_zeros(1, kpts.shape[-1]).detach(), counts
        return kpts[match.batch_idx, match.pred_idx].detach(), list(match.counts)

    def forward(
        self,
        outputs: PETROutputs,
        targets: list[PoseTargets],
        matches: PETRMatches | None = None,
    ) -> dict[str, Tensor]:
        """Weighted losses.

        Args:
            outputs: see PETROutputs; joint_kpts, when present, refine the poses of
                `joint_decoder_inputs(outputs, matches)`.
            targets: one PoseTargets per image (boxes are read by the heatmap loss only).
            matches: `self.match(outputs, targets)`, when the caller already has it.

        Returns:
            {loss name: weighted scalar}: loss_{cls,kpt}_enc; loss_{cls,kpt,oks}_{i} for pose
            layers i < Ld-1 and unsuffixed for the last; loss_{kpt,oks}_refine_{j}; loss_hm.
        """
        if matches is None:
            matches = self.match(outputs, targets)
        pose_logits, pose_kpts = outputs.pose_logits.float(), outputs.pose_kpts.float()
        num_layers = pose_logits.shape[0]
        if len(matches.layers) != num_layers or len(matches.last.counts) != len(targets):
            raise ValueError(
                f"matches has {len(matches.layers)} layers of {len(matches.last.counts)} images; "
                f"the outputs have {num_layers} layers of {len(targets)} images"
            )

        losses = {}
        if outputs.enc_logits is not None:
            if matches.enc is None:
                raise ValueError("outputs has encoder proposals but matches.enc is None")
            enc_logits, enc_kpts = outputs.enc_logits.float(), outputs.enc_kpts.float()
            matched = matches.enc
            losses["loss_cls_enc"] = self._weight("cls_enc") * self._focal(enc_logits, matched)
            losses["loss_kpt_enc"] = self._weight("kpt_enc") * self._l1(enc_kpts, matched)

        for i, matched in enumerate(matches.layers):
            suffix = "" if i == num_layers - 1 else f"_{i}"
            losses[f"loss_cls{suffix}"] = self._weight("cls") * self._focal(pose_logits[i], matched)
            losses[f"loss_kpt{suffix}"] = self._weight("kpt") * self._l1(pose_kpts[i], matched)
            losses[f"loss_oks{suffix}"] = self._weight("oks") * self._oks(pose_kpts[i], matched)

        if outputs.joint_kpts is not None:
            losses.update(self._joint_losses(outputs.joint_kpts, matches.last))
        if outputs.hm_logits is not None:
            losses["loss_hm"] = self._weight("hm") * self._heatmap(outputs, targets)
        return losses

    def _prepare_targets(self, targets: list[PoseTargets], device) -> list[dict]:
        """Per image: normalised (G, K, 2) keypoints, (G, K) visibility, areas, (1, 2K) scale."""
        gts = []
        for t in targets:
            kpts = t.keypoints.to(device=device, dtype=torch.float32)
            height, width = (float(s) for s in t.image_size)
            visible = kpts[..., 2] > 0
            scale = kpts.new_tensor([width, height])
            # Invisible joints may hold anything: zero them, they carry weight 0 everywhere.
            kpts_norm = torch.where(visible[..., None], kpts[..., :2] / scale, 0.0)
            gts.append(
                {
                    "kpts_norm": kpts_norm,
                    "visible": visible,
                    "areas": t.areas.to(device=device, dtype=torch.float32),
                    "scale": scale.repeat(self.num_keypoints)[None],
                }
            )
        return gts

    def _focal(self, logits: Tensor, matched: LayerMatch) -> Tensor:
        """Sigmoid focal loss over every query of every image; logits (B, Q, 1)."""
        labels = torch.zeros_like(logits[..., 0])
        labels[matched.batch_idx, matched.pred_idx] = 1.0
        loss = sigmoid_focal_loss_sum(logits[..., 0], labels, self.focal_alpha, self.focal_gamma)
        return loss / normaliser(len(matched), logits.device)

    def _l1(self, kpts: Tensor, matched: LayerMatch) -> Tensor:
        """L1 on visible normalised coords of matched queries; kpts (B, Q, 2K)."""
        pred = kpts[matched.batch_idx, matched.pred_idx]
        loss = masked_l1_sum(pred, matched.target, matched.weight)
        return loss / normaliser(matched.weight.sum(), kpts.device)

    def _oks(self, kpts: Tensor, matched: LayerMatch) -> Tensor:
        """-log OKS in pixels over matched queries; kpts (B, Q, 2K)."""
        # Every process must join the normaliser's all_reduce, with or without positives.
        norm = normaliser(len(matched), kpts.device)
        if len(matched) == 0:
            return kpts.sum() * 0
        pred = kpts[matched.batch_idx, matched.pred_idx]
        return self._oks_sum(pred, matched) / norm

    def _oks_sum(self, pred: Tensor, matched: LayerMatch) -> Tensor:
        shape = (len(matched), self.num_keypoints, 2)
        # The official code rescales the normalised target, not the raw pixels.
        pred_px = (pred * matched.scale).reshape(shape)
        gt_px = (matched.target * matched.scale).reshape(shape)
        sigmas = self.oks_sigmas.to(pred.device)
        return oks_loss_sum(pred_px, gt_px, matched.visible, matched.areas, sigmas)

    def _joint_losses(self, joint_kpts: Tensor, matched: LayerMatch) -> dict[str, Tensor]:
        """Joint-decoder L1 and OKS per layer against the last pose layer's matched targets;
        0 times the output for the dummy pose of a batch without positives."""
        joint_kpts = joint_kpts.float()
        num_layers = joint_kpts.shape[0]
        expected = (num_layers, max(len(matched), 1), self.num_keypoints, 2)
        if joint_kpts.shape != expected:
            raise ValueError(
                f"outputs.joint_kpts is {tuple(joint_kpts.shape)}, expected {expected} "
                f"({len(matched)} matched instances in the last pose layer, 1 dummy pose if 0)"
            )
        weight_kpt, weight_oks = self._weight("kpt_refine"), self._weight("oks_refine")
        l1_norm = normaliser(matched.weight.sum(), joint_kpts.device)
        oks_norm = normaliser(len(matched), joint_kpts.device)
        losses = {}
        for j in range(num_layers):
            if len(matched) == 0:
                # Official: the output times 0, so every joint-decoder parameter gets a gradient.
                zero = joint_kpts[j].sum() * 0
                losses[f"loss_kpt_refine_{j}"] = zero
                losses[f"loss_oks_refine_{j}"] = zero.clone()
                continue
            pred = joint_kpts[j].reshape(len(matched), -1)  # (N, K, 2) -> (N, 2K) interleaved
            l1 = masked_l1_sum(pred, matched.target, matched.weight) / l1_norm
            losses[f"loss_kpt_refine_{j}"] = weight_kpt * l1
            losses[f"loss_oks_refine_{j}"] = weight_oks * self._oks_sum(pred, matched) / oks_norm
        return losses

    def _heatmap(self, outputs: PETROutputs, targets: list[PoseTargets]) -> Tensor:
        if outputs.hm_padding_mask is None:
            raise ValueError("PETRCriterion: outputs has hm_logits but no hm_padding_mask")
        logits, mask = outputs.hm_logits.float(), outputs.hm_padding_mask
        num_images = len(targets)
        if logits.dim() != 4 or logits.shape[:2] != (num_images, self.num_keypoints):
            raise ValueError(
                f"outputs.hm_logits must be ({num_images}, {self.num_keypoints}, H0, W0), "
                f"got {tuple(logits.shape)}"
            )
        if mask.shape != (num_images, *logits.shape[2:]):
            raise ValueError(
                f"outputs.hm_padding_mask is {tuple(mask.shape)}, expected "
                f"{(num_images, *logits.shape[2:])}"
            )
        # Drawn on the host: take the host copies when the caller kept them (PETR does), so
        # the device keypoints and boxes are not read back.
        target = _host_heatmap_targets(
            [t.keypoints if t.host_keypoints is None else t.host_keypoints for t in targets],
            [t.boxes if t.host_boxes is None else t.host_boxes for t in targets],
            logits.shape[2:],
        ).to(logits.device, non_blocking=True)
        return center_focal_loss(logits, target, mask.to(device=logits.device, dtype=torch.bool))
