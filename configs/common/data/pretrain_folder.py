"""Unlabelled-image data for iTPN pre-training (LazyConfig piece).

Usage in a pre-training config:

    from ..common.data.pretrain_folder import dataloader
    dataloader.train.dataset.names = "imagenet_train_unlabeled"   # $DETECTRON2_DATASETS/imagenet/train
    dataloader.train.total_batch_size = 4096

Any folder of images can be registered with
``itpn_d2.data.image_folder.register_image_folder(name, root)``.
Skipped (unreadable) files are reported per batch as ``skipped_images`` in the metrics.
"""
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from omegaconf import OmegaConf

from itpn_d2.data.mim_mapper import MIMDatasetMapper

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
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
    # sampler=None -> TrainingSampler: an infinite, seeded shuffle shared out across ranks and workers.
    total_batch_size=64,
    # all samples have the same size; grouping would need "width"/"height" in the dataset dicts
    aspect_ratio_grouping=False,
    num_workers=4,
)
