"""What happens with images that cannot be read (missing, truncated, not decodable).

Training: `PETRDatasetMapper` returns None for such an image, so Detectron2's MapDataset draws
another one in its place, and attaches the failure (path, reason) to the next sample it returns
under `BAD_IMAGES_KEY`. `BadImageMonitor`, around the training loader in the main process, takes
them off the samples, logs each file once, counts every failed read (EventStorage scalar
`data/bad_image_reads`) and stops training when more than `max_share` of the reads failed.

Evaluation: the mapper returns the dict with `UNREADABLE_KEY` (the reason) and no image;
`SkipUnreadableImages` around the test loader drops it with a warning and counts it, and the
evaluator then scores only the images that were read.
"""

import logging
import math

from detectron2.utils.events import get_event_storage

from .annotation_checks import take_training_reports

__all__ = [
    "BAD_IMAGES_KEY",
    "UNREADABLE_KEY",
    "BadImageError",
    "BadImageMonitor",
    "SkipUnreadableImages",
]

BAD_IMAGES_KEY = "petr_bad_images"  # list of (file_name, reason) on a training sample
UNREADABLE_KEY = "petr_unreadable"  # reason, on a test dict whose image could not be read
logger = logging.getLogger(__name__)


class BadImageError(RuntimeError):
    """Too many training images could not be read; the message lists the first files."""


def _listing(failures, limit=5):
    shown = [f"{path} ({reason})" for path, reason in list(failures.items())[:limit]]
    more = f", and {len(failures) - limit} more" if len(failures) > limit else ""
    return "; ".join(shown) + more


class BadImageMonitor:
    """Iterable over training batches (lists of dicts) of `loader` that accounts for the image
    reads that failed on the way (see module docstring).

    The share of failed reads is judged from the first ceil(1 / max_share) reads on, so that one
    bad file drawn early in a large dataset does not end a run. Reads are counted in this
    process (rank); each rank judges its own reads.
    """

    def __init__(self, loader, max_share: float = 0.01):
        if not 0 < max_share <= 1:
            raise ValueError(f"DATALOADER.PETR.MAX_BAD_IMAGE_SHARE must be in (0, 1]: {max_share}")
        self.loader = loader
        # The load-time annotation checks of the training set just built (annotation_checks)
        self.annotation_reports = take_training_reports()
        self.max_share = max_share
        self.reads = 0
        self.failed = 0
        self.failures = {}  # file_name -> reason, first failure of each file, in order

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        reported = False
        for batch in self.loader:
            for d in batch:
                self._account(d.pop(BAD_IMAGES_KEY, ()))
            self.reads += len(batch)
            self._check()
            try:
                storage = get_event_storage()
            except AssertionError:  # iterated outside a training loop: nothing to report to
                storage = None
            if storage is not None:
                storage.put_scalar("data/bad_image_reads", self.failed, smoothing_hint=False)
                if not reported:
                    self._put_annotation_reports(storage)
                    reported = True
            yield batch

    def _put_annotation_reports(self, storage):
        """One line in the event storage: the training set's bad annotations, per reason."""
        scalars = {"data/bad_annotations": sum(r.bad for r in self.annotation_reports)}
        for report in self.annotation_reports:
            for reason, count in report.counts.items():
                key = f"data/bad_annotations/{report.dataset}/{reason}"
                scalars[key] = scalars.get(key, 0) + count
        storage.put_scalars(**scalars, smoothing_hint=False)

    def _account(self, failures):
        for path, reason in failures:
            self.failed += 1
            self.reads += 1
            if path not in self.failures:
                self.failures[path] = reason
                logger.warning(
                    f"Cannot read training image {path}: {reason}; replaced by another image "
                    f"({self.failed} failed reads so far)"
                )

    def _check(self):
        if self.reads < math.ceil(1 / self.max_share) or self.failed <= self.max_share * self.reads:
            return
        raise BadImageError(
            f"{self.failed} of {self.reads} training image reads failed, more than "
            f"DATALOADER.PETR.MAX_BAD_IMAGE_SHARE = {self.max_share:g}; first files: "
            f"{_listing(self.failures)}"
        )

    def summary(self) -> str:
        if not self.failed:
            return f"All {self.reads} training image reads succeeded"
        return (
            f"{self.failed} of {self.reads} training image reads failed and were replaced, "
            f"{len(self.failures)} distinct files: {_listing(self.failures)}"
        )


class SkipUnreadableImages:
    """Iterable over test batches of `loader` without the dicts whose image could not be read;
    `skipped` maps each skipped file to the reason (this rank's, last pass)."""

    def __init__(self, loader, dataset_name: str):
        self.loader = loader
        self.dataset_name = dataset_name
        self.skipped = {}  # file_name -> reason

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.skipped = {}
        for batch in self.loader:
            kept = []
            for d in batch:
                reason = d.get(UNREADABLE_KEY)
                if reason is None:
                    kept.append(d)
                    continue
                self.skipped[d["file_name"]] = reason
                logger.warning(
                    f"Cannot read test image {d['file_name']} of {self.dataset_name!r}: {reason}; "
                    "skipped (the evaluation scores the images that were read)"
                )
            if kept:
                yield kept
        if self.skipped:
            logger.warning(
                f"Skipped {len(self.skipped)} unreadable images of {self.dataset_name!r}: "
                f"{_listing(self.skipped)}"
            )
