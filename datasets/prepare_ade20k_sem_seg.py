#!/usr/bin/env python
"""Convert ADE20K-150 (ADEChallengeData2016) labels to detectron2's layout.

ADE20K's PNGs hold 0 = "other" (not evaluated) and 1..150 = classes. detectron2's
builtin ``ade20k_sem_seg_{train,val}`` read ``annotations_detectron2/{training,validation}``
with 0..149 = classes and 255 = ignore. This writes those files:

    python datasets/prepare_ade20k_sem_seg.py            # $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_ade20k_sem_seg.py --root /data/ADEChallengeData2016

The conversion: ``itpn_d2/data/ade20k.py``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from itpn_d2.data.ade20k import SPLITS, convert_split  # noqa: E402


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
