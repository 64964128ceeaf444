"""How well per-joint confidences (pred_keypoints[..., 2], MODEL.PETR.JOINT_SCORES) tell
labelled joints from out-of-frame ones, and visible from hidden ones: the ROC AUC over the
joints of predictions matched to ground-truth people by OKS.

COCO visibility: v=2 labelled and visible, v=1 labelled but hidden, v=0 not labelled (for the
toy dataset: out of frame). Keypoints are in Detectron2's continuous pixels of the original
image, for the predictions and the dataset dicts alike.
"""

import logging
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from scipy.stats import rankdata

from ..modeling.oks import keypoint_oks

__all__ = ["JointConfidenceEvaluator", "match_by_oks", "roc_auc", "joint_confidence_report"]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC: the probability that a random positive outscores a random negative (ties count
    half), by the Mann-Whitney rank statistic. NaN when either class is empty."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def match_by_oks(
    pred_kpts: torch.Tensor,
    pred_scores: torch.Tensor,
    gt_kpts: torch.Tensor,
    gt_areas: torch.Tensor,
    sigmas: torch.Tensor,
    threshold: float = 0.5,
) -> List[tuple]:
    """COCOeval's greedy matching: predictions by decreasing score, each takes the unmatched
    ground truth of highest OKS (over its labelled joints) if that OKS >= threshold.
    pred_kpts (N, K, >=2), gt_kpts (G, K, 3) pixels, pred_scores (N,), gt_areas (G,).
    Ground truths without a labelled joint are never matched. Returns [(pred index, gt index)]."""
    if len(pred_kpts) == 0 or len(gt_kpts) == 0:
        return []
    labelled = gt_kpts[..., 2] > 0  # (G, K)
    oks = keypoint_oks(
        pred_kpts[:, None, :, :2].double(), gt_kpts[None, :, :, :2].double(), labelled[None],
        gt_areas[None].double(), sigmas.double(),
    )  # fmt: skip
    oks = torch.nan_to_num(oks, nan=-1.0).numpy()  # (N, G); no labelled joint: never matched
    taken, pairs = np.zeros(len(gt_kpts), bool), []
    for i in torch.argsort(pred_scores, descending=True, stable=True).tolist():
        candidates = np.where(taken, -1.0, oks[i])
        g = int(candidates.argmax())
        if candidates[g] >= threshold:
            taken[g] = True
            pairs.append((i, g))
    return pairs


def joint_confidence_report(confidences: np.ndarray, visibility: np.ndarray) -> Dict[str, float]:
    """AUCs and per-class means of the confidences of matched joints with ground-truth
    visibility v in {0, 1, 2}."""
    c, v = np.asarray(confidences, np.float64), np.asarray(visibility)
    report = {
        "AUC labelled vs out of frame": roc_auc(c, v > 0),
        "AUC visible vs not": roc_auc(c, v == 2),
        "AUC visible vs hidden": roc_auc(c[v > 0], v[v > 0] == 2),
    }
    for value, name in ((2, "visible"), (1, "hidden"), (0, "out of frame")):
        n = int((v == value).sum())
        report[f"joints {name}"] = n
        report[f"mean confidence {name}"] = float(c[v == value].mean()) if n else float("nan")
    return report


class JointConfidenceEvaluator(DatasetEvaluator):
    """A Detectron2 evaluator of per-joint confidences on a registered keypoint dataset (needs
    keypoint_oks_sigmas in its metadata, and "area" in its annotations, as COCO's)."""

    def __init__(self, dataset_name: str, oks_threshold: float = 0.5, sigmas: Sequence = None):
        self.dataset_name = dataset_name
        self.oks_threshold = oks_threshold
        sigmas = sigmas or MetadataCatalog.get(dataset_name).get("keypoint_oks_sigmas")
        if sigmas is None:
            raise ValueError(f"{dataset_name}: metadata has no keypoint_oks_sigmas to match by OKS")
        self.sigmas = torch.tensor(sigmas, dtype=torch.float64)
        self._predictions = []

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            self._predictions.append((x["image_id"], inst.pred_keypoints, inst.scores))

    def evaluate(self):
        predictions = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return {}
        gts = {d["image_id"]: d for d in DatasetCatalog.get(self.dataset_name)}
        conf, vis, people, matched = [], [], 0, 0
        for image_id, kpts, scores in (p for chunk in predictions for p in chunk):
            anns = [a for a in gts[image_id].get("annotations", []) if not a.get("iscrowd", 0)]
            anns = [a for a in anns if "keypoints" in a]
            people += len(anns)
            if not anns:
                continue
            gt = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float64).view(
                len(anns), -1, 3
            )  # (G, K, 3) pixels
            if gt.shape[1] != kpts.shape[1]:
                raise ValueError(
                    f"{self.dataset_name} image {image_id}: {gt.shape[1]} ground-truth "
                    f"keypoints, the model predicts {kpts.shape[1]}"
                )
            areas = torch.tensor([float(a["area"]) for a in anns], dtype=torch.float64)
            for i, g in match_by_oks(kpts, scores, gt, areas, self.sigmas, self.oks_threshold):
                conf.append(kpts[i, :, 2].double().numpy())
                vis.append(gt[g, :, 2].numpy())
                matched += 1
        if not conf:
            logging.getLogger(__name__).warning("No prediction matched a ground-truth person")
            return {}
        report = joint_confidence_report(np.concatenate(conf), np.concatenate(vis))
        report.update({"people": people, "people matched": matched})
        return OrderedDict(joint_confidence=report)
