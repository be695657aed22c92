"""
Per-class cross-entropy weights for semantic segmentation, from a registered dataset's label maps.

ENet's weighting (Paszke et al. 2016, "ENet: A Deep Neural Network Architecture for Real-Time
Semantic Segmentation", section 4): ``w_c = 1 / ln(c + p_c)`` with ``p_c`` the share of labelled
pixels of class ``c`` and ``c = 1.02``. Weights lie between ``1 / ln(1 + c) ~ 1.4`` (a class that
covers everything) and ``1 / ln(c) ~ 50`` (a class that covers nothing), so a rare class gets more
weight without the unbounded ratio of inverse frequencies.

Print the weights of a dataset (what ``configs/ADE20K/uper_itpn_tiny_demo.py`` holds)::

    python -m itpn_d2.data.class_weights itpn_synthetic_sem_seg_train
"""
import argparse
import json
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["label_frequencies", "enet_class_weights", "main"]


def label_frequencies(dataset_name: str, num_classes: Optional[int] = None) -> np.ndarray:
    """Share of the labelled pixels of each class over every ``sem_seg_file_name`` of a
    registered dataset. ``num_classes`` defaults to ``len(metadata.stuff_classes)``; pixels equal
    to ``metadata.ignore_label`` (255 if unset) are not counted.

    Returns:
        (num_classes,) float64 summing to 1.
    Raises:
        ValueError naming the file and value when a label map holds a class id outside
        ``[0, num_classes)`` that is not the ignore label.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    meta = MetadataCatalog.get(dataset_name)
    if num_classes is None:
        num_classes = len(meta.stuff_classes)
    ignore = meta.get("ignore_label", 255)
    counts = np.zeros(256, dtype=np.int64)
    for d in DatasetCatalog.get(dataset_name):
        label = np.asarray(Image.open(d["sem_seg_file_name"]))
        if label.ndim != 2 or label.dtype != np.uint8:
            raise ValueError(f"{d['sem_seg_file_name']}: a label map must be one 8-bit channel of class ids, "
                             f"got shape {label.shape} dtype {label.dtype}")
        c = np.bincount(label.ravel(), minlength=256)
        bad = [int(v) for v in np.nonzero(c)[0] if v >= num_classes and v != ignore]
        if bad:
            raise ValueError(f"{d['sem_seg_file_name']}: label value(s) {bad} outside 0..{num_classes - 1} "
                             f"(ignore label {ignore})")
        counts += c
    total = counts[:num_classes].sum()
    if total == 0:
        raise ValueError(f"dataset '{dataset_name}' has no labelled pixel")
    return counts[:num_classes] / total


def enet_class_weights(frequencies: Sequence[float], c: float = 1.02) -> List[float]:
    """ENet's ``1 / ln(c + p)`` for each class share ``p`` (module docstring)."""
    p = np.asarray(frequencies, dtype=np.float64)
    if (p < 0).any() or c <= 1.0:
        raise ValueError(f"need shares >= 0 and c > 1, got {p.tolist()} and c={c}")
    return (1.0 / np.log(c + p)).tolist()


def main(argv=None) -> List[float]:
    """Print the shares and ENet weights (rounded to 2 decimals) of a dataset as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a registered semantic segmentation dataset")
    parser.add_argument("--c", type=float, default=1.02, help="ENet's constant (default 1.02)")
    args = parser.parse_args(argv)
    import itpn_d2.data  # noqa: F401  (registers the built-in datasets)

    freqs = label_frequencies(args.dataset)
    weights = [round(w, 2) for w in enet_class_weights(freqs, args.c)]
    print(json.dumps({"dataset": args.dataset, "shares": [round(f, 4) for f in freqs.tolist()],
                      "enet_weights": weights}))
    return weights


if __name__ == "__main__":
    main()
