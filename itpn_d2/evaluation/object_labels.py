"""The objects a semantic segmenter labels right: each object's commonest predicted class.

mIoU weighs pixels, so a large ring segmented well can hide three small triangles called
"star". What a person looking at a rendered segmentation judges is closer to this: is each object
painted, mostly, in its own class? For every instance of a detection dataset (its mask from the
annotation), the evaluator takes the commonest predicted class over the mask's pixels and counts
the object as right when that class has the instance's category name. It needs a segmentation
dataset whose images also have instance annotations under another registered name (the built-in
``itpn_synthetic_sem_seg_val`` and ``itpn_synthetic_val`` are the same 50 images).

Results, under the task ``object_labels``: ``right`` and ``objects`` (counts over the dataset),
``all`` (percent of objects right) and ``pct-<category>``, the percent right of each category that has
objects, e.g. ``object_labels/pct-triangle`` (a prefix, as ``SemSegEvaluator``'s ``IoU-<class>``, so that
no category name can overwrite a total); with no object at all, only the two counts (0). Ties between classes go to
the lower class index. Images of the evaluated dataset that the detection dataset does not have are
skipped and counted in a warning.
"""
import itertools
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import polygons_to_bitmask
from detectron2.utils import comm

__all__ = ["ObjectLabelEvaluator"]

logger = logging.getLogger(__name__)


def _object_mask(segmentation, height: int, width: int) -> np.ndarray:
    """An annotation's ``segmentation`` -> (H, W) bool, as detectron2's ``annotations_to_instances``
    reads it: polygons, or RLE (detectron2's COCO loader has already compressed uncompressed RLE)."""
    if isinstance(segmentation, list):
        return polygons_to_bitmask(segmentation, height, width)
    if isinstance(segmentation, dict):
        return mask_util.decode(segmentation).astype(bool)
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


class ObjectLabelEvaluator(DatasetEvaluator):
    """Counts the objects whose pixels the model labels, mostly, with their own class.

    ``process`` reads ``output["sem_seg"]``, (K, H, W) scores at the input's ``height`` x
    ``width`` (detectron2's ``SemanticSegmentor`` output), and the input's ``file_name``.
    """

    def __init__(self, instances_dataset: str, sem_seg_dataset: str, *, distributed: bool = True):
        """
        Args:
            instances_dataset: registered detection dataset with the objects (masks, categories)
                of the same images, matched by ``file_name``.
            sem_seg_dataset: the segmentation dataset evaluated; its ``stuff_classes`` name the
                model's K outputs.
            distributed: gather the counts of every process before ``evaluate``.
        """
        self._distributed = distributed
        self._stuff_classes: List[str] = list(MetadataCatalog.get(sem_seg_dataset).stuff_classes)
        thing_classes: List[str] = list(MetadataCatalog.get(instances_dataset).thing_classes)
        missing = [c for c in thing_classes if c not in self._stuff_classes]
        if missing:
            raise ValueError(
                f"ObjectLabelEvaluator: categories {missing} of {instances_dataset!r} are not classes of "
                f"{sem_seg_dataset!r} ({self._stuff_classes})"
            )
        self._thing_classes = thing_classes
        self._thing_to_stuff = [self._stuff_classes.index(c) for c in thing_classes]
        # objects per image: file path -> (height, width, [(segmentation, category index)])
        self._objects: Dict[str, Tuple[int, int, List]] = {}
        for d in DatasetCatalog.get(instances_dataset):
            anns = [(a["segmentation"], a["category_id"]) for a in d.get("annotations", []) if "segmentation" in a]
            self._objects[os.path.abspath(d["file_name"])] = (d["height"], d["width"], anns)
        self._instances_dataset = instances_dataset
        self.reset()

    def reset(self) -> None:
        self._right = np.zeros(len(self._thing_classes), dtype=np.int64)
        self._total = np.zeros(len(self._thing_classes), dtype=np.int64)
        self._unmatched: List[str] = []

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            key = os.path.abspath(inp["file_name"])
            if key not in self._objects:
                self._unmatched.append(inp["file_name"])
                continue
            labels = out["sem_seg"].argmax(dim=0).cpu().numpy()
            height, width, anns = self._objects[key]
            if labels.shape != (height, width):
                raise ValueError(
                    f"ObjectLabelEvaluator: {inp['file_name']}: prediction of shape {labels.shape}, but "
                    f"{self._instances_dataset!r} annotates it at {(height, width)}"
                )
            for segmentation, category in anns:
                mask = _object_mask(segmentation, height, width)
                if not mask.any():
                    continue
                votes = np.bincount(labels[mask], minlength=len(self._stuff_classes))
                self._total[category] += 1
                self._right[category] += int(votes.argmax() == self._thing_to_stuff[category])

    def evaluate(self) -> Optional[Dict]:
        right, total, unmatched = self._right, self._total, self._unmatched
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather((right, total, unmatched), dst=0)
            if not comm.is_main_process():
                return None
            right = sum(g[0] for g in gathered)
            total = sum(g[1] for g in gathered)
            unmatched = list(itertools.chain.from_iterable(g[2] for g in gathered))
        if unmatched:
            logger.warning(f"ObjectLabelEvaluator: {len(unmatched)} images without objects in "
                           f"{self._instances_dataset!r}, e.g. {unmatched[0]}")
        if total.sum() == 0:
            logger.warning("ObjectLabelEvaluator: no object was evaluated")
            return OrderedDict(object_labels={"right": 0.0, "objects": 0.0})
        res = {"right": float(right.sum()), "objects": float(total.sum()), "all": 100.0 * right.sum() / total.sum()}
        for name, r, t in zip(self._thing_classes, right, total):
            if t:
                res[f"pct-{name}"] = 100.0 * r / t
        per_class = ", ".join(f"{n} {r}/{t}" for n, r, t in zip(self._thing_classes, right, total))
        logger.info(f"Objects labelled with their own class (commonest label of their pixels): "
                    f"{right.sum()}/{total.sum()}: {per_class}")
        return OrderedDict(object_labels=res)
