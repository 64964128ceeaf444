"""CrowdPose evaluation: AP/AR at OKS 0.50:0.95 and AP on the easy/medium/hard crowd splits.

Uses xtcocotools' `COCOeval(..., "keypoints_crowd", sigmas, use_area=False)` exactly as the
official PETR (hikvision-research/opera) `CrowdPoseDataset.evaluate`: at most 20 people per
image, OKS area = 0.53 * box area, and the split by each image's "crowdIndex" (< 0.2 easy,
< 0.8 medium, else hard).
"""

import contextlib
import copy
import io
import itertools
import json
import logging
import os
from collections import OrderedDict

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from xtcocotools.coco import COCO
from xtcocotools.cocoeval import COCOeval

from ..data.metadata import KeypointSpec

__all__ = ["CrowdPoseEvaluator"]

CROWDPOSE_METRICS = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard")


def _load_gt(json_file, ground_truth=None):
    """COCO api of `json_file`, or of the dict `ground_truth` (a fresh copy) when given."""
    with contextlib.redirect_stdout(io.StringIO()):
        if ground_truth is None:
            return COCO(PathManager.get_local_path(json_file))
        coco = COCO()
        coco.dataset = copy.deepcopy(ground_truth)
        coco.createIndex()
        return coco


class CrowdPoseEvaluator(DatasetEvaluator):
    """Evaluate "pred_keypoints" (N, K, 3), in original-image pixels (Detectron2's continuous
    convention, as `COCOEvaluator`), on a CrowdPose-format dataset.

    The dataset's metadata must have `json_file`; every image of the json needs "crowdIndex" and
    every annotation "num_keypoints". Results are percentages, as Detectron2's COCOEvaluator.
    `ground_truth`: a COCO-format dict to score against instead of the json (the json without
    its malformed annotations, petr.evaluation.preflight).
    """

    def __init__(
        self,
        dataset_name,
        output_dir=None,
        *,
        distributed=True,
        kpt_oks_sigmas=None,
        ground_truth=None,
    ):
        self._logger = logging.getLogger(__name__)
        self._metadata = MetadataCatalog.get(dataset_name)
        self._json_file = self._metadata.get("json_file")
        if not self._json_file:
            raise ValueError(f"CrowdPoseEvaluator: dataset {dataset_name!r} has no json_file")
        if kpt_oks_sigmas:
            sigmas = [float(s) for s in kpt_oks_sigmas]
        else:
            spec = KeypointSpec.from_metadata(self._metadata, sigmas_key="kpt_oks_sigmas")
            sigmas = spec.oks_sigmas
        self._sigmas = np.asarray(sigmas, dtype=np.float64)
        self._output_dir = output_dir
        self._distributed = distributed
        self._ground_truth = ground_truth
        gt = _load_gt(self._json_file, ground_truth)
        missing = [img["id"] for img in gt.dataset.get("images", []) if "crowdIndex" not in img]
        if missing:
            raise ValueError(
                f"{self._json_file}: {len(missing)} images lack 'crowdIndex' (e.g. image id "
                f"{missing[0]}), which the CrowdPose easy/medium/hard split needs"
            )
        no_count = [
            a.get("id") for a in gt.dataset.get("annotations", []) if "num_keypoints" not in a
        ]
        if no_count:
            raise ValueError(
                f"{self._json_file}: {len(no_count)} annotations lack 'num_keypoints' (e.g. "
                f"annotation id {no_count[0]}), which 'keypoints_crowd' evaluation reads"
            )
        self._cat_ids = sorted(gt.getCatIds())
        self.reset()

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "instances" in out:
                instances = out["instances"].to(torch.device("cpu"))
                self._predictions.extend(instances_to_coco_json(instances, inp["image_id"]))

    def _to_dataset_category_ids(self, results):
        # load_coco_json numbers the json's sorted category ids 0, 1, ...; its map is in the
        # metadata only once the dataset was loaded, so fall back to the same rule.
        id_map = self._metadata.get("thing_dataset_id_to_contiguous_id")
        reverse = {v: k for k, v in id_map.items()} if id_map else dict(enumerate(self._cat_ids))
        for r in results:
            if r["category_id"] not in reverse:
                raise ValueError(
                    f"Prediction of image {r['image_id']} has class {r['category_id']}; "
                    f"{self._json_file} has {len(reverse)} categories"
                )
            r["category_id"] = reverse[r["category_id"]]
        return results

    def evaluate(self, img_ids=None):
        """Metrics over `img_ids` (default: every image of the json)."""
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = list(self._predictions)
        # Copies: remapping ids and xtcocotools' loadRes edit the dicts in place.
        results = self._to_dataset_category_ids([dict(p) for p in predictions])
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "crowdpose_keypoints_results.json")
            self._logger.info(f"Saving results to {path}")
            with PathManager.open(path, "w") as f:
                json.dump(results, f)
        if not results:
            self._logger.warning("[CrowdPoseEvaluator] No predictions: every metric is 0.")
            return OrderedDict(keypoints={k: 0.0 for k in CROWDPOSE_METRICS})
        return OrderedDict(keypoints=self._run_cocoeval(results, img_ids))

    def _run_cocoeval(self, results, img_ids=None):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            # fresh: COCOeval mutates the ground truth it reads
            gt = _load_gt(self._json_file, self._ground_truth)
            dt = gt.loadRes(results)
            coco_eval = COCOeval(gt, dt, "keypoints_crowd", self._sigmas, use_area=False)
            if img_ids is not None:
                coco_eval.params.imgIds = list(img_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self._logger.info("CrowdPose evaluation:\n" + log.getvalue())
        return {
            name: float(stat * 100) if stat >= 0 else float("nan")
            for name, stat in zip(CROWDPOSE_METRICS, coco_eval.stats)
        }
