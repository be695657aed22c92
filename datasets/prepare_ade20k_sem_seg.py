#!/usr/bin/env python
"""Convert ADE20K-150 (ADEChallengeData2016) labels to detectron2's layout.

ADE20K's PNGs hold 0 = "other" (not evaluated) and 1..150 = classes. detectron2's
builtin ``ade20k_sem_seg_{train,val}`` read ``annotations_detectron2/{training,validation}``
with 0..149 = classes and 255 = ignore. This writes those files:

    python datasets/prepare_ade20k_sem_seg.py            # $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_ade20k_sem_seg.py --root /data/ADEChallengeData2016
"""

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

SPLITS = ("training", "validation")


def convert_label(label: np.ndarray) -> np.ndarray:
    """ADE20K (0 other, 1..150) -> detectron2 (255 ignore, 0..149)."""
    if label.ndim != 2:
        raise ValueError(f"expected a single-channel label map, got shape {label.shape}")
    if label.max(initial=0) > 150:
        raise ValueError(f"label values above 150 ({label.max()}): not an ADE20K-150 annotation")
    out = label.astype(np.int64) - 1
    out[out < 0] = 255
    return out.astype(np.uint8)


def _convert_file(args):
    src, dst = args
    label = np.asarray(Image.open(src))
    try:
        out = convert_label(label)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    Image.fromarray(out).save(dst)


def convert_split(root: str, split: str, workers: int = 4) -> int:
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
            list(ex.map(_convert_file, jobs, chunksize=64))
    else:
        for j in jobs:
            _convert_file(j)
    return len(jobs)


def main(argv=None):
    default_root = os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "ADEChallengeData2016"
    )
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=default_root, help="the ADEChallengeData2016 folder (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)
    for split in SPLITS:
        n = convert_split(args.root, split, args.workers)
        print(f"{split}: {n} label maps -> {os.path.join(args.root, 'annotations_detectron2', split)}")


if __name__ == "__main__":
    main()
