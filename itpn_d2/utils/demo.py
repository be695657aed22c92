"""The demo: an iTPN model run on images, a folder or a video, written as detectron2
``Visualizer`` renderings (instances or semantic segmentation), in the style of detectron2's
``demo/demo.py``, for LazyConfig ``.py`` configs. ``tools/demo.py`` runs :func:`main`.

* :func:`expand_inputs`: ``--input`` files, folders (every image inside) and glob patterns;
* :func:`setup_cfg`: the config with its checked ``--opts``, on the CPU unless they say otherwise;
* :func:`run_images` / :func:`run_video`: predict and draw; an unreadable image is skipped,
  counted and named, and a run in which none is readable is an error
  (:class:`NoReadableInputError`).

Weights are loaded by :func:`itpn_d2.utils.weights.load_weights` (``train.init_checkpoint``;
random weights only with ``--random-weights``). Bad input ends :func:`main` with one
``ERROR:`` line: exit status 2 for a config error, 1 otherwise.
"""
import argparse
import glob
import os
import time

import cv2
import numpy as np
import tqdm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from itpn_d2.checkpoint import BackboneLoadError, CheckpointFileError
from itpn_d2.config import ConfigOverrideError, add_opts_argument, load_config
from itpn_d2.utils.predictor import LazyPredictor, metadata_for, sem_seg_labels_to_draw, visualize
from itpn_d2.utils.user_errors import exit_on_user_error
from itpn_d2.utils.weights import load_weights

__all__ = [
    "NoReadableInputError",
    "IMAGE_EXTS",
    "get_parser",
    "expand_inputs",
    "setup_cfg",
    "output_path",
    "run_images",
    "run_video",
    "main",
]


class NoReadableInputError(RuntimeError):
    """None of the input images could be read."""


# The user's input, not a bug: one ERROR line and a non-zero exit.
USER_ERRORS = (ConfigOverrideError, CheckpointFileError, BackboneLoadError, FileNotFoundError, NoReadableInputError)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/demo.py``."""
    p = argparse.ArgumentParser(description="iTPN detectron2 demo")
    p.add_argument("--config-file", required=True, metavar="FILE", help="a LazyConfig .py file")
    p.add_argument("--input", nargs="+", help="image files, folders, or glob patterns")
    p.add_argument("--video-input", help="a video file")
    p.add_argument(
        "--output",
        help="a folder for the renderings, or a file name when there is one input image / a video; "
        "without it, nothing is written and the timings are printed",
    )
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of drawn instances")
    p.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast (CPU or GPU)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="run without train.init_checkpoint on purpose (an untrained model); refused otherwise",
    )
    add_opts_argument(p)
    return p


def expand_inputs(inputs):
    """The image files named by ``inputs`` (files, folders, glob patterns), in order; a folder
    gives its images sorted by name. Raises ``FileNotFoundError`` for an item naming none."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(f for f in glob.glob(os.path.join(item, "*")) if f.lower().endswith(IMAGE_EXTS))
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
        if not found:
            raise FileNotFoundError(f"--input {item!r}: no image files found")
        files.extend(found)
    return files


def _demo_defaults(cfg):
    if "train" not in cfg:  # a model-only config, e.g. configs/common/models/*.py
        cfg.train = {"init_checkpoint": ""}
    cfg.train.device = "cpu"  # --opts train.device=cuda overrides it


def setup_cfg(args):
    """The config of ``args.config_file`` with ``args.opts`` (checked), on the CPU unless the
    overrides say otherwise, its box predictor dropping scores under ``--confidence-threshold``."""
    cfg = load_config(args.config_file, args.opts, edit=_demo_defaults)
    # Drop detections under the threshold already in the box predictor, as detectron2's demo does.
    predictor = cfg.model.get("roi_heads", {}).get("box_predictor", None)
    if predictor is not None and "test_score_thresh" in predictor:
        predictor.test_score_thresh = args.confidence_threshold
    return cfg


def output_path(output, input_path, n_inputs):
    """Where the rendering of ``input_path`` goes: inside ``output`` when it is a folder (or
    there are several inputs), else ``output`` itself. Creates the folder."""
    if os.path.isdir(output) or n_inputs > 1 or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(input_path))
    parent = os.path.dirname(output)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return output


def _read_bgr(path):
    """(H, W, 3) uint8 BGR, or None for a file that is not a readable image."""
    try:
        with PathManager.open(path, "rb") as f:
            buf = np.frombuffer(f.read(), np.uint8)
        return cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except (OSError, cv2.error):
        return None


def run_images(args, predictor, metadata, logger, files=None):
    """Run on every input image; an unreadable one is skipped, counted and named in the summary
    line. Returns (done, skipped file names)."""
    files = expand_inputs(args.input) if files is None else files
    skipped, done = [], 0
    for path in tqdm.tqdm(files, disable=not args.output):
        img = _read_bgr(path)
        if img is None:
            skipped.append(path)
            logger.warning(f"skipping {path!a}: not a readable image")
            continue
        t = time.time()
        pred = predictor(img)
        logger.info(f"{path}: {_describe(pred)} in {time.time() - t:.2f}s")
        if args.output:
            vis = visualize(img, pred, metadata, args.confidence_threshold)
            out = output_path(args.output, path, len(files))
            if not cv2.imwrite(out, vis[:, :, ::-1]):
                raise OSError(f"cannot write {out}")
        done += 1
    shown = ", ".join(repr(os.path.basename(f))[1:-1] for f in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    logger.info(f"{done} images done, {len(skipped)} skipped" + (f" (unreadable: {shown})" if skipped else ""))
    if not done:
        raise NoReadableInputError(f"--input: none of the {len(files)} files is a readable image")
    return done, skipped


def run_video(args, predictor, metadata, logger):
    from detectron2.utils.video_visualizer import VideoVisualizer

    cap = cv2.VideoCapture(args.video_input)
    if not cap.isOpened():
        raise FileNotFoundError(f"--video-input {args.video_input!r}: cannot open")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    writer = None
    if args.output:
        out = args.output
        if os.path.isdir(out):
            out = os.path.join(out, os.path.splitext(os.path.basename(args.video_input))[0] + ".mkv")
        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if out.endswith(".mp4") else "MJPG"))
        writer = cv2.VideoWriter(out, fourcc, fps, (w, h), True)
        if not writer.isOpened():
            raise OSError(f"cannot write video {out}")
    vv = VideoVisualizer(metadata)
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        pred = predictor(frame)
        rgb = frame[:, :, ::-1]
        if "instances" in pred:
            inst = pred["instances"].to("cpu")
            inst = inst[inst.scores >= args.confidence_threshold] if inst.has("scores") else inst
            vis = vv.draw_instance_predictions(rgb, inst)
        elif "sem_seg" in pred:
            vis = vv.draw_sem_seg(rgb, sem_seg_labels_to_draw(pred["sem_seg"], metadata))
        else:
            raise KeyError(f"nothing to draw: predictions have keys {sorted(pred)}")
        if writer is not None:
            writer.write(vis.get_image()[:, :, ::-1])
        n += 1
    cap.release()
    if writer is not None:
        writer.release()
    logger.info(f"{args.video_input}: {n} frames")


def _describe(pred):
    if "instances" in pred:
        return f"{len(pred['instances'])} instances"
    if "sem_seg" in pred:
        return f"sem_seg {tuple(pred['sem_seg'].shape)}"
    return ", ".join(pred)


def main(argv=None) -> None:
    """``tools/demo.py``: parse ``argv`` (default ``sys.argv``), build the model, load its
    weights and render every input. Exits (``SystemExit``) on bad input, with one ``ERROR:``
    line: status 2 for a config error, 1 otherwise."""
    args = get_parser().parse_args(argv)
    if bool(args.input) == bool(args.video_input):
        raise SystemExit("give exactly one of --input and --video-input")
    setup_logger(name="fvcore")
    setup_logger(name="itpn_d2")
    logger = setup_logger(name="itpn_d2.demo")
    try:
        files = expand_inputs(args.input) if args.input else None  # before building the model
        cfg = setup_cfg(args)
        predictor = LazyPredictor(cfg, bf16=args.bf16)
        train = cfg.get("train", {})
        load_weights(
            predictor.model,
            train.get("init_checkpoint", ""),
            backbone_load=train.get("backbone_load", "strict"),
            allow_random=args.random_weights,
            missing_hint="no weights: set --opts train.init_checkpoint=PATH (or pass --random-weights to run an "
            "untrained model on purpose)",
            log=logger,
        )
        metadata = metadata_for(cfg)
        if args.input:
            run_images(args, predictor, metadata, logger, files)
        else:
            run_video(args, predictor, metadata, logger)
    except USER_ERRORS as e:
        exit_on_user_error(e)
