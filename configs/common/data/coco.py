"""COCO instance segmentation data with the DETR-style multi-scale augmentation of the iTPN recipe.

Training (the reference's mmdet ``AutoAugment`` with two policies, each with probability 1/2):
  flip; then either  resize shorter side to one of 480..800 (step 32, longer side <= 1333)
  or  resize to one of 400/500/600, random crop of 384..600 px (absolute range), and resize
  to one of 480..800. Both policies end with the same resize, so the second is written as a
  ``RandomApply(p=0.5)`` of "resize 400-600 + crop" in front of the common resize.
Test: shorter side 800, longer side <= 1333. Images are RGB (the iTPN backbone's order).
64 images per batch, as the release: 32 GPUs x 2 images (sunsmarterjie/iTPN ``det/README.md``:
"We use 32 V100 GPUs"; ``det/configs/_base_/datasets/coco_instance.py``: ``samples_per_gpu=2``).
detectron2 splits ``total_batch_size`` over the processes; the COCO configs compute lr,
iterations, warm-up and LR steps from it (``configs/common/coco_schedule.py``), so
``dataloader.train.total_batch_size=16`` on 8 GPUs needs no other change.

For detection-only data (no masks), set ``dataloader.train.mapper.use_instance_mask = False``
(see ``configs/COCO/faster_rcnn_itpn_base_1x.py``).
"""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from itpn_d2.data.resumable import build_resumable_train_loader
from itpn_d2.data.safe_mapper import SafeDatasetMapper

dataloader = model_zoo.get_config("common/data/coco.py").dataloader

MULTI_SCALE = tuple(range(480, 801, 32))  # 480, 512, ..., 800

dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.RandomApply)(
        tfm_or_aug=L(T.AugmentationList)(
            augs=[
                L(T.ResizeShortestEdge)(short_edge_length=(400, 500, 600), max_size=1333, sample_style="choice"),
                L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
            ]
        ),
        prob=0.5,
    ),
    L(T.ResizeShortestEdge)(short_edge_length=MULTI_SCALE, max_size=1333, sample_style="choice"),
]
dataloader.train.mapper.image_format = "RGB"
# skips (logs, counts) unreadable training images instead of stopping the run
dataloader.train.mapper._target_ = SafeDatasetMapper
# resumable stream: --resume continues the same images and augmentations, and N processes
# see the global batches of 1 (itpn_d2.data.resumable; aspect-ratio groups as detectron2's)
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.aspect_ratio_grouping = True
dataloader.train.seed = 0
dataloader.train.mapper.use_instance_mask = True
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)]
