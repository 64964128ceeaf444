#!/usr/bin/env python
"""Draw PETR poses on images, a video or a webcam stream (Detectron2's demo/demo.py).

    python tools/demo.py --config-file configs/petr_R50.yaml --input img1.jpg folder/ "d/*.png" \
        --output out/ --opts MODEL.WEIGHTS petr_r50.pth
    python tools/demo.py --config-file configs/petr_R50.yaml --video-input v.mp4 --output out/
    python tools/demo.py --config-file configs/petr_R50.yaml --webcam --opts MODEL.WEIGHTS m.pth
Without --output, results are shown in a window (needs an OpenCV build with GUI support).
Unreadable image files are reported and skipped; 16-bit and 1-channel images are read as 8-bit
(petr.data.image_io). Drawings are saved with the long side at most --max-output-size (4096
px) unless --full-size. The exit code is 1, with one error line, if nothing was drawn, if
--input finds no image, if the video has no frame, or if an output cannot be written; a video
is written under a temporary name and renamed when complete, so no half-written file is left.
"""

import argparse
import glob
import logging
import os
import sys
import time

import cv2
import tqdm
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import _KEYPOINT_THRESHOLD

from petr import get_petr_cfg
from petr.data.image_io import read_image
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
        "--max-output-size", type=int, default=4096, metavar="PX",
        help="save image drawings with the long side at most PX (a 48 MP photo drawn at full "
        "size needs several GB)",
    )  # fmt: skip
    parser.add_argument(
        "--full-size", action="store_true", help="save image drawings at the input's size"
    )
    parser.add_argument(
        "--keypoint-threshold",
        type=float,
        default=_KEYPOINT_THRESHOLD,
        help="draw joints whose confidence (pred_keypoints[..., 2]) exceeds this "
        f"(default: Detectron2's Visualizer, {_KEYPOINT_THRESHOLD})",
    )
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="predict with this graph from tools/export_onnx.py on onnxruntime (the config "
        "gives the test resize and metadata; MODEL.WEIGHTS is not read)",
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


class DemoError(RuntimeError):
    """The demo cannot do what it was asked; main() logs it and exits with status 1."""


def _output_path(output, path, many):
    """Inside `output` when it is (or must be, for several inputs) a folder, else `output`."""
    folder = many or os.path.isdir(output) or output.endswith(os.sep)
    try:
        os.makedirs(output if folder else os.path.dirname(os.path.abspath(output)), exist_ok=True)
    except OSError as e:
        raise DemoError(f"Cannot create the output folder for {output!r}: {e.strerror or e}") from e
    return os.path.join(output, os.path.basename(path)) if folder else output


def run_on_images(demo, paths, output, max_side=None):
    """Returns the number of images drawn; unreadable files are logged by name and skipped.
    Raises DemoError when a drawing cannot be written."""
    done = 0
    for path in tqdm.tqdm(paths, disable=len(paths) < 2, desc="images"):
        try:
            image = read_image(path, format="BGR")
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
            logger.warning(f"Cannot read image {path}: {e}; skipped")
            continue
        start = time.time()
        predictions, vis = demo.run_on_image(image, max_side=max_side)
        n = int((predictions["instances"].scores >= demo.confidence_threshold).sum())
        logger.info(f"{path}: {n} poses in {time.time() - start:.2f}s")
        if output:
            target = _output_path(output, path, len(paths) > 1)
            try:
                vis.save(target)
            except OSError as e:
                raise DemoError(f"Cannot write the drawing {target!r}: {e.strerror or e}") from e
        else:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, vis.get_image()[:, :, ::-1])
            if cv2.waitKey(0) == 27:  # ESC
                break
        done += 1
    return done


def _video_output(output, video_path):
    if os.path.isdir(output) or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.splitext(os.path.basename(video_path))[0] + ".mp4")
    return output


def run_on_video(demo, video_path, output):
    """Returns the number of frames drawn (0 if the video cannot be opened). Raises DemoError
    when the video has no frame or the output cannot be written. The output is written under a
    temporary name beside it and renamed once complete."""
    if output:
        output = _video_output(output, video_path)
        folder, name = os.path.split(os.path.abspath(output))
        partial = os.path.join(folder, f".{name}.partial.mp4")  # the extension picks the muxer
        if not os.access(folder, os.W_OK):
            raise DemoError(
                f"Cannot open the video writer for {output!r}: its folder does not exist or is "
                "not writable"
            )
    video = cv2.VideoCapture(video_path)
    if not video.isOpened():
        logger.error(f"Cannot open video {video_path}")
        return 0
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer, done = None, 0
    try:
        for frame in tqdm.tqdm(demo.run_on_video(video), total=num_frames, desc="frames"):
            if output and writer is None:
                height, width = frame.shape[:2]
                writer = cv2.VideoWriter(
                    partial, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height)
                )
                if not writer.isOpened():
                    raise DemoError(
                        f"Cannot open the video writer for {output!r} (mp4v, {width}x{height}): "
                        "is its folder writable?"
                    )
            if writer is not None:
                writer.write(frame)
            else:
                cv2.namedWindow(os.path.basename(video_path), cv2.WINDOW_NORMAL)
                cv2.imshow(os.path.basename(video_path), frame)
                if cv2.waitKey(1) == 27:  # ESC
                    break
            done += 1
        if not done:
            raise DemoError(f"Video {video_path} has no frame that can be decoded")
        if writer is not None:
            writer.release()
            os.replace(partial, output)
    finally:
        video.release()
        if writer is not None:
            writer.release()
            if os.path.exists(partial):
                os.remove(partial)  # incomplete
        elif not output:
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
        onnx_path=args.onnx,
    )
    try:
        if args.input:
            max_side = None if args.full_size else args.max_output_size
            done = run_on_images(demo, paths, args.output, max_side)
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
