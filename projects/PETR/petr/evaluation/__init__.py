"""Evaluation: Detectron2's COCOEvaluator with the dataset's OKS sigmas, or CrowdPose's E/M/H."""

import contextlib
import io

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from pycocotools.coco import COCO

from ..data.metadata import KeypointSpec
from .crowdpose_evaluation import CrowdPoseEvaluator
from .preflight import preflight_ground_truth

__all__ = ["CrowdPoseEvaluator", "ReadImagesOnly", "build_keypoint_evaluator"]


class ReadImagesOnly(DatasetEvaluator):
    """Scores only the images it was given: with an unreadable test image skipped
    (petr.data.bad_images.SkipUnreadableImages), its ground truth would otherwise count as
    missed. `evaluator` takes `evaluate(img_ids=...)` (COCOEvaluator, CrowdPoseEvaluator); the
    ids are sorted, as COCOeval's default, so the result is unchanged when nothing was skipped."""

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self._image_ids = []

    def reset(self):
        self._image_ids = []
        self.evaluator.reset()

    def process(self, inputs, outputs):
        self._image_ids += [x["image_id"] for x in inputs]
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        ids = self._image_ids
        if comm.get_world_size() > 1:
            ids = [i for rank_ids in comm.all_gather(ids) for i in rank_ids]
        return self.evaluator.evaluate(img_ids=sorted(set(ids)))


def build_keypoint_evaluator(cfg, dataset_name, output_folder=None):
    """The keypoint evaluator for `dataset_name`, chosen by its metadata's `evaluator_type`:
    "crowdpose" -> CrowdPoseEvaluator, "coco" (default) -> COCOEvaluator on keypoints.

    OKS sigmas: TEST.KEYPOINT_OKS_SIGMAS when set, else the metadata's `keypoint_oks_sigmas`,
    else the COCO/CrowdPose defaults for K = 17/14; any other K without sigmas is an error.

    The ground truth is checked first (petr.evaluation.preflight, before any inference): no
    annotations or another K is an error; malformed annotations are left out of what the
    evaluator scores against (logged with their ids).
    """
    meta = MetadataCatalog.get(dataset_name)
    spec = KeypointSpec.from_metadata(
        meta,
        default_num_keypoints=cfg.MODEL.PETR.NUM_KEYPOINTS,
        oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
        sigmas_key="TEST.KEYPOINT_OKS_SIGMAS",
    )
    evaluator_type = meta.get("evaluator_type", "coco")
    if evaluator_type not in ("coco", "crowdpose"):
        raise ValueError(
            f"Dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; PETR evaluates "
            "'coco' or 'crowdpose' keypoint datasets"
        )
    ground_truth = preflight_ground_truth(
        dataset_name,
        spec.num_keypoints,
        cfg.DATALOADER.PETR.MAX_BAD_ANNOTATION_SHARE,
        check_sizes=cfg.DATALOADER.PETR.CHECK_IMAGE_SIZES,
    )
    sigmas = spec.oks_sigmas
    if evaluator_type == "crowdpose":
        return CrowdPoseEvaluator(
            dataset_name, output_folder, kpt_oks_sigmas=sigmas, ground_truth=ground_truth
        )
    # The official pycocotools COCOeval, as the official results (not Detectron2's fast one).
    evaluator = COCOEvaluator(
        dataset_name,
        tasks=("keypoints",),
        output_dir=output_folder,
        use_fast_impl=False,
        kpt_oks_sigmas=sigmas,
    )
    if ground_truth is not None:
        # COCOEvaluator takes no ground truth but its dataset's json: give it the checked one
        evaluator._coco_api = _coco_api(ground_truth)
    return evaluator


def _coco_api(ground_truth):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
    return coco
