"""Unlabelled-image data for iTPN pre-training (LazyConfig piece).

Usage in a pre-training config:

    from ..common.data.pretrain_folder import dataloader
    dataloader.train.dataset.names = "imagenet_train_unlabeled"   # $DETECTRON2_DATASETS/imagenet/train
    dataloader.train.total_batch_size = 4096

Any folder of images can be registered with
``itpn_d2.data.image_folder.register_image_folder(name, root)``.
Skipped (unreadable) files are reported per batch as ``skipped_images`` in the metrics.

The loader is :func:`itpn_d2.data.build_resumable_train_loader`, detectron2's
``build_detection_train_loader`` with one difference: every sample (its image, crop, flip
and mask) is a function of ``dataloader.train.seed`` and its position in the global
stream, so ``--resume`` continues the very same data and a run on N processes sees the
same global batches as one on 1 process. Change ``dataloader.train.seed`` for another order.
"""
from detectron2.config import LazyCall as L
from detectron2.data import get_detection_dataset_dicts
from omegaconf import OmegaConf

from itpn_d2.data.mim_mapper import MIMDatasetMapper
from itpn_d2.data.resumable import build_resumable_train_loader

dataloader = OmegaConf.create()

dataloader.train = L(build_resumable_train_loader)(
    # get_detection_dataset_dicts accepts one name or a list, and with
    # filter_empty=False it needs no annotations.
    dataset=L(get_detection_dataset_dicts)(names="itpn_synthetic_unlabeled", filter_empty=False),
    mapper=L(MIMDatasetMapper)(
        image_size=224,
        scale=(0.2, 1.0),
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        hflip_prob=0.5,
        color_jitter=0.0,  # 0.4 in the CLIP-teacher recipe
    ),
    total_batch_size=64,
    num_workers=4,
    seed=0,  # the data seed: samples, augmentations and masks derive from it and their position
)
