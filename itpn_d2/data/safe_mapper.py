"""detectron2's ``DatasetMapper`` that skips unreadable images instead of killing the run.

A corrupt, truncated, empty or non-image file named by a COCO-style dataset makes
``detectron2.data.DatasetMapper`` raise inside a DataLoader worker, which ends the
training job. :class:`SafeDatasetMapper` takes the same arguments, decodes the image
itself (strict about truncation; grayscale, RGBA, palette and 16-bit files converted as
:func:`itpn_d2.data.mim_mapper.read_rgb_image` does), and for a file that cannot be
decoded, or whose annotations or size are unusable (an annotation without
``segmentation`` when masks are trained, a JPEG whose EXIF rotation makes it disagree with
the json's width / height, a semantic segmentation label map (``sem_seg_file_name``) that
cannot be decoded or is not the image's size), logs one warning naming it (once per file and
process), counts it (``num_skipped``; also handed to the next good sample as
``"skipped_images"``) and returns ``None``: the loader then maps another index of the dataset.

Use it for training only: at test time a skipped image would silently change the
evaluated set, so test loaders keep the failing ``DatasetMapper``.
"""
import copy
from typing import Optional

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .mim_mapper import read_rgb_image
from .skipped_files import SkippedFileCounter

__all__ = ["SafeDatasetMapper"]



class SafeDatasetMapper(SkippedFileCounter, DatasetMapper):
    """``DatasetMapper`` (same arguments) that returns ``None`` for an unreadable image."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_skip_counter()

    def read_image(self, file_name: str) -> np.ndarray:
        """(H, W, 3) uint8 in ``self.image_format`` (RGB / BGR), or detectron2's reader for other formats."""
        if self.image_format in ("RGB", "BGR"):
            image = read_rgb_image(file_name)
            return image[:, :, ::-1].copy() if self.image_format == "BGR" else image
        return utils.read_image(file_name, format=self.image_format)

    def read_sem_seg(self, file_name: str, image_size) -> Optional[np.ndarray]:
        """The (H, W) label map of a semantic segmentation sample, read as detectron2's mapper
        reads it; ``None`` (counted, warned once) for a file that cannot be decoded or whose
        size is not ``image_size``: a mis-sized label map would fail the loss of the batch."""
        try:
            sem_seg = utils.read_image(file_name, "L").squeeze(2)
        except Exception as e:  # as for images: decoders raise a zoo of types
            self._skip(file_name, e, "unreadable label map")
            return None
        if sem_seg.shape != tuple(image_size):
            (h, w), (ih, iw) = sem_seg.shape, image_size
            err = ValueError(f"label map of {w}x{h}, image of {iw}x{ih}")
            self._skip(file_name, err, "label map whose size disagrees with its image,")
            return None
        return sem_seg

    def unusable_annotations(self, dataset_dict) -> Optional[Exception]:
        """Why the annotations of ``dataset_dict`` cannot be mapped (an exception to report), or None.

        Checked before mapping because detectron2 fails on them deep inside
        ``annotations_to_instances`` (a ``KeyError`` that ends the run)."""
        if not self.is_train:
            return None
        for i, obj in enumerate(dataset_dict.get("annotations", ())):
            if obj.get("iscrowd", 0) != 0:
                continue  # removed by the mapper before use
            missing = [k for k in ("bbox", "bbox_mode", "category_id") if k not in obj]
            if self.use_instance_mask and "segmentation" not in obj:
                missing.append("segmentation")
            if self.use_keypoint and "keypoints" not in obj:
                missing.append("keypoints")
            if missing:
                return KeyError(f"annotation {i} has no {', '.join(repr(k) for k in missing)}")
            if len(obj["bbox"]) != 4:
                return ValueError(f"annotation {i} has a bbox of {len(obj['bbox'])} numbers, not 4")
        return None

    def __call__(self, dataset_dict):
        """As ``DatasetMapper.__call__``; ``None`` (counted, warned once) when the image file cannot
        be decoded, an annotation lacks a field the mapper needs (e.g. ``segmentation`` with
        ``use_instance_mask``), the decoded size disagrees with the entry's width / height, or the
        label map cannot be read or is not the image's size (:meth:`read_sem_seg`)."""
        file_name = dataset_dict["file_name"]
        try:
            image = self.read_image(file_name)
        except Exception as e:  # decoders raise a zoo of types; only decoding is in this try
            self._skip(file_name, e)
            return None
        problem = self.unusable_annotations(dataset_dict)
        if problem is not None:
            self._skip(file_name, problem, "sample with unusable annotations of")
            return None
        dataset_dict = copy.deepcopy(dataset_dict)  # the dataset's dicts are shared: never modify them
        try:
            utils.check_image_size(dataset_dict, image)
        except utils.SizeMismatchError as e:  # e.g. an EXIF rotation the json's width/height ignore
            self._skip(file_name, e, "sample whose image size disagrees with its dataset entry,")
            return None
        sem_seg_gt = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = self.read_sem_seg(dataset_dict.pop("sem_seg_file_name"), image.shape[:2])
            if sem_seg_gt is None:
                return None

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        self._hand_over_skips(dataset_dict)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
