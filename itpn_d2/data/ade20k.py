"""ADE20K-150 (ADEChallengeData2016) label maps in detectron2's layout.

ADE20K's PNGs hold 0 = "other" (not evaluated) and 1..150 = classes. detectron2's builtin
``ade20k_sem_seg_{train,val}`` read ``annotations_detectron2/{training,validation}`` with
0..149 = classes and 255 = ignore. :func:`convert_split` writes those files from
``annotations/{training,validation}`` (``datasets/prepare_ade20k_sem_seg.py`` runs it for
both splits).
"""
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Tuple

import numpy as np
from PIL import Image

__all__ = ["SPLITS", "ADE20K_NUM_CLASSES", "convert_label", "convert_label_file", "convert_split"]

SPLITS = ("training", "validation")
ADE20K_NUM_CLASSES = 150
IGNORE_LABEL = 255  # detectron2's sem_seg ignore value


def convert_label(label: np.ndarray) -> np.ndarray:
    """ADE20K (0 other, 1..150) -> detectron2 (255 ignore, 0..149)."""
    if label.ndim != 2:
        raise ValueError(f"expected a single-channel label map, got shape {label.shape}")
    if label.max(initial=0) > ADE20K_NUM_CLASSES:
        raise ValueError(f"label values above {ADE20K_NUM_CLASSES} ({label.max()}): not an ADE20K-150 annotation")
    out = label.astype(np.int64) - 1
    out[out < 0] = IGNORE_LABEL
    return out.astype(np.uint8)


def convert_label_file(src_dst: Tuple[str, str]) -> None:
    """Convert the label PNG ``src`` into ``dst``; a ``ValueError`` names ``src``. One tuple
    argument, for ``Executor.map``."""
    src, dst = src_dst
    label = np.asarray(Image.open(src))
    try:
        out = convert_label(label)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    Image.fromarray(out).save(dst)


def convert_split(root: str, split: str, workers: int = 4) -> int:
    """Convert every PNG of ``root/annotations/<split>`` into ``root/annotations_detectron2/<split>``
    with ``workers`` processes (1: in this process). Returns the number of label maps."""
    src_dir = os.path.join(root, "annotations", split)
    dst_dir = os.path.join(root, "annotations_detectron2", split)
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"{src_dir} not found: unpack ADEChallengeData2016.zip under {os.path.dirname(root)}")
    os.makedirs(dst_dir, exist_ok=True)
    jobs = [
        (os.path.join(src_dir, f), os.path.join(dst_dir, f)) for f in sorted(os.listdir(src_dir)) if f.endswith(".png")
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(convert_label_file, jobs, chunksize=64))
    else:
        for j in jobs:
            convert_label_file(j)
    return len(jobs)
