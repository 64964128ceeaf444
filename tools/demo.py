#!/usr/bin/env python
"""Draw PETR poses on images, a video or a webcam stream (Detectron2's demo/demo.py).

    python tools/demo.py --config-file configs/petr_R50.yaml --input img1.jpg folder/ "d/*.png" \
        --output out/ --opts MODEL.WEIGHTS petr_r50.pth
    python tools/demo.py --config-file configs/petr_R50.yaml --video-input v.mp4 --output out/
    python tools/demo.py --config-file configs/petr_R50.yaml --webcam --opts MODEL.WEIGHTS m.pth
Without --output, results are shown in a window (needs an OpenCV build with GUI support).
Unreadable image files are reported and skipped; the exit code is 1 if nothing was drawn, if
--input finds no image, or if the video writer for --output cannot be opened.
"""

import argparse
import glob
import logging
import os
import sys
import time

import cv2
import tqdm
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import _KEYPOINT_THRESHOLD

from petr import get_petr_cfg
from petr.demo import VisualizationDemo

WINDOW_NAME = "PETR"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("petr.demo")


def setup_cfg(args):
    cfg = get_petr_cfg(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="PETR demo: draw multi-person poses")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--webcam", action="store_true", help="take inputs from the webcam")
    parser.add_argument("--video-input", help="path to a video file")
    parser.add_argument(
        "--input", nargs="+", help="image files, glob patterns or folders (all images inside)"
    )
    parser.add_argument(
        "--output",
        help="a file or a folder for the drawings (a folder for several images); "
        "if not given, show them in a window",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.3, help="draw poses scoring at least this"
    )
    parser.add_argument(
        "--keypoint-threshold",
        type=float,
        default=_KEYPOINT_THRESHOLD,
        help="draw joints whose confidence (pred_keypoints[..., 2]) exceeds this "
        f"(default: Detectron2's Visualizer, {_KEYPOINT_THRESHOLD})",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs"
    )
    return parser


def collect_inputs(patterns):
    """Expand files, globs and folders (their image files, sorted) into a list of paths. A
    pattern that matches nothing (or a folder without images) is reported and skipped."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            names = sorted(os.listdir(pattern))
            found = [
                os.path.join(pattern, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
            ]
            if not found:
                logger.warning(f"No image ({', '.join(IMAGE_EXTENSIONS)}) in folder {pattern!r}")
            paths += found
        elif os.path.exists(pattern):
            paths.append(pattern)
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                logger.warning(f"No file matches {pattern!r}; skipped")
            paths += matches
    return paths


def _output_path(output, path, many):
    """Inside `output` when it is (or must be, for several inputs) a folder, else `output`."""
    if many or os.path.isdir(output) or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(path))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return output


def run_on_images(demo, paths, output):
    """Returns the number of images drawn; unreadable files are logged by name and skipped."""
    done = 0
    for path in tqdm.tqdm(paths, disable=len(paths) < 2, desc="images"):
        try:
            image = read_image(path, format="BGR")
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
            logger.warning(f"Cannot read image {path}: {e}; skipped")
            continue
        start = time.time()
        predictions, vis = demo.run_on_image(image)
        n = int((predictions["instances"].scores >= demo.confidence_threshold).sum())
        logger.info(f"{path}: {n} poses in {time.time() - start:.2f}s")
        if output:
            vis.save(_output_path(output, path, len(paths) > 1))
        else:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, vis.get_image()[:, :, ::-1])
            if cv2.waitKey(0) == 27:  # ESC
                break
        done += 1
    return done


class DemoError(RuntimeError):
    """The demo cannot do what it was asked; main() logs it and exits with status 1."""


def run_on_video(demo, video_path, output):
    """Returns the number of frames drawn (0 if the video cannot be opened). Raises DemoError
    when the output writer cannot be opened."""
    video = cv2.VideoCapture(video_path)
    if not video.isOpened():
        logger.error(f"Cannot open video {video_path}")
        return 0
    width, height = (
        int(video.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer = None
    if output:
        if os.path.isdir(output) or output.endswith(os.sep):
            os.makedirs(output, exist_ok=True)
            name = os.path.splitext(os.path.basename(video_path))[0] + ".mp4"
            output = os.path.join(output, name)
        writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            video.release()
            raise DemoError(
                f"Cannot open the video writer for {output!r} (mp4v, {width}x{height}): does "
                "its folder exist and is it writable?"
            )
    done = 0
    try:
        for frame in tqdm.tqdm(demo.run_on_video(video), total=num_frames, desc="frames"):
            if writer is not None:
                writer.write(frame)
            else:
                cv2.namedWindow(os.path.basename(video_path), cv2.WINDOW_NORMAL)
                cv2.imshow(os.path.basename(video_path), frame)
                if cv2.waitKey(1) == 27:  # ESC
                    break
            done += 1
    finally:
        video.release()
        if writer is not None:
            writer.release()
        else:
            cv2.destroyAllWindows()
    return done


def run_on_webcam(demo):
    cam = cv2.VideoCapture(0)
    if not cam.isOpened():
        logger.error("Cannot open the webcam (device 0)")
        return 0
    done = 0
    try:
        for frame in tqdm.tqdm(demo.run_on_video(cam), desc="frames"):
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, frame)
            done += 1
            if cv2.waitKey(1) == 27:  # ESC
                break
    finally:
        cam.release()
        cv2.destroyAllWindows()
    return done


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logger.info(f"Arguments: {args}")
    sources = [bool(args.input), bool(args.video_input), args.webcam]
    if sum(sources) != 1:
        logger.error("Give exactly one of --input, --video-input, --webcam")
        return 2
    paths = collect_inputs(args.input) if args.input else []
    if args.input and not paths:
        logger.error(f"No image found under --input {' '.join(args.input)}")
        return 1
    cfg = setup_cfg(args)
    demo = VisualizationDemo(
        cfg,
        confidence_threshold=args.confidence_threshold,
        config_file=args.config_file,
        keypoint_threshold=args.keypoint_threshold,
    )
    try:
        if args.input:
            done = run_on_images(demo, paths, args.output)
            logger.info(f"Drew {done} of {len(paths)} images")
        elif args.video_input:
            done = run_on_video(demo, args.video_input, args.output)
        else:
            done = run_on_webcam(demo)
    except DemoError as e:
        logger.error(str(e))
        return 1
    return 0 if done else 1


if __name__ == "__main__":
    # Only as a script: setup_logger stops propagation, which would hide records from callers.
    setup_logger(name="fvcore")
    setup_logger(name="petr")
    sys.exit(main())
