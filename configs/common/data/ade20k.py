"""ADE20K-150 semantic segmentation loaders (detectron2's builtin ``ade20k_sem_seg_{train,val}``,
under ``$DETECTRON2_DATASETS/ADEChallengeData2016``; see datasets/README.md).

Training augmentation as the release (sunsmarterjie/iTPN ``seg/configs/_base_/datasets/ade20k.py``,
mmseg's pipeline): resize with ratio 0.5-2.0 of (2048, 512), i.e. short side uniform in 256..1024
(long side at most 2048; mmseg caps it at 2048 x ratio, which binds only for aspect ratios
above 4), 512x512 crop in which no class covers more than 75 % of the pixels, horizontal flip,
``PhotoMetricDistortion`` (brightness, contrast, saturation, hue, as mmseg:
``itpn_d2.data.photometric``). Test: short side 512, long side at most 2048. mmseg pads crops to
512 (label 255); detectron2 pads a batch to its largest image (divisible by 32), also with 255.
The evaluator uses a numpy-2-safe label loader. The training mapper skips (logs, counts in the
``skipped_images`` metric) an image or label map it cannot read instead of stopping the run
(``SafeDatasetMapper``); the test mapper is detectron2's, which fails: a skipped test image would
change the evaluated set.
"""

from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import SemSegEvaluator
from omegaconf import OmegaConf

from itpn_d2.data.photometric import PhotoMetricDistortion
from itpn_d2.data.resumable import build_resumable_train_loader
from itpn_d2.data.safe_mapper import SafeDatasetMapper
from itpn_d2.evaluation.sem_seg import sem_seg_loading_fn

dataloader = OmegaConf.create()

# resumable stream: --resume continues the same images and augmentations (itpn_d2.data.resumable)
dataloader.train = L(build_resumable_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_train", filter_empty=False),
    mapper=L(SafeDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(256, 1024), max_size=2048, sample_style="range"),
            L(T.RandomCrop_CategoryAreaConstraint)(
                crop_type="absolute",
                crop_size=(512, 512),
                single_category_max_area=0.75,
                ignored_category=255,
            ),
            L(T.RandomFlip)(horizontal=True),
            L(PhotoMetricDistortion)(image_format="${...image_format}"),
        ],
        image_format="RGB",
        use_instance_mask=False,
    ),
    total_batch_size=16,
    num_workers=4,
    aspect_ratio_grouping=True,
    seed=0,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=512, max_size=2048)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(SemSegEvaluator)(
    dataset_name="${..test.dataset.names}",
    sem_seg_loading_fn=sem_seg_loading_fn,
)
