"""Evaluation: Detectron2's COCOEvaluator with the dataset's OKS sigmas, or CrowdPose's E/M/H."""

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm

from ..data.metadata import KeypointSpec
from .crowdpose_evaluation import CrowdPoseEvaluator

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
    """
    meta = MetadataCatalog.get(dataset_name)
    sigmas = KeypointSpec.from_metadata(
        meta,
        default_num_keypoints=cfg.MODEL.PETR.NUM_KEYPOINTS,
        oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS,
        sigmas_key="TEST.KEYPOINT_OKS_SIGMAS",
    ).oks_sigmas
    evaluator_type = meta.get("evaluator_type", "coco")
    if evaluator_type == "crowdpose":
        return CrowdPoseEvaluator(dataset_name, output_folder, kpt_oks_sigmas=sigmas)
    if evaluator_type == "coco":
        # The official pycocotools COCOeval, as the official results (not Detectron2's fast one).
        return COCOEvaluator(
            dataset_name,
            tasks=("keypoints",),
            output_dir=output_folder,
            use_fast_impl=False,
            kpt_oks_sigmas=sigmas,
        )
    raise ValueError(
        f"Dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; PETR evaluates "
        "'coco' or 'crowdpose' keypoint datasets"
    )
