"""Semantic segmentation evaluation that works with numpy 2.

detectron2's ``SemSegEvaluator`` reads ground-truth PNGs with
``np.array(img, copy=False, dtype=...)``; numpy 2 raises there whenever a copy is
needed (always, for a PIL image). ``sem_seg_loading_fn`` is the drop-in
replacement to pass as ``SemSegEvaluator(sem_seg_loading_fn=...)``.
"""

from typing import Optional, Union

import numpy as np
from PIL import Image

from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.file_io import PathManager

__all__ = ["sem_seg_loading_fn", "build_sem_seg_evaluator"]


def sem_seg_loading_fn(filename: str, dtype: Optional[Union[np.dtype, str]] = None) -> np.ndarray:
    """Read a label image (PNG of class ids) into an (H, W) array of ``dtype``."""
    with PathManager.open(filename, "rb") as f:
        img = Image.open(f)
        img.load()
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"{filename}: a semantic label image must have one channel; got shape {arr.shape}")
    # np.array (not asarray): the evaluator writes into the result.
    return np.array(arr, dtype=dtype)


def build_sem_seg_evaluator(dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True):
    """``SemSegEvaluator`` for ``dataset_name`` with the numpy-2-safe loader."""
    return SemSegEvaluator(
        dataset_name, distributed=distributed, output_dir=output_dir, sem_seg_loading_fn=sem_seg_loading_fn
    )
