"""ADE20K-150 semantic segmentation loaders (detectron2's builtin ``ade20k_sem_seg_{train,val}``,
under ``$DETECTRON2_DATASETS/ADEChallengeData2016``; see datasets/README.md).

Training augmentation as the mmseg/BEiT recipe the iTPN numbers use: resize the
short side to 0.5-2.0 x 512 (long side at most 2048), 512x512 crop in which no
class covers more than 75 % of the pixels, horizontal flip. Test: short side 512.
The evaluator uses a numpy-2-safe label loader.
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

from itpn_d2.data.resumable import build_resumable_train_loader
from itpn_d2.evaluation.sem_seg import sem_seg_loading_fn

dataloader = OmegaConf.create()

# resumable stream: --resume continues the same images and augmentations (itpn_d2.data.resumable)
dataloader.train = L(build_resumable_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_train", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=[int(512 * r / 10) for r in range(5, 21)],
                max_size=2048,
                sample_style="choice",
            ),
            L(T.RandomCrop_CategoryAreaConstraint)(
                crop_type="absolute",
                crop_size=(512, 512),
                single_category_max_area=0.75,
                ignored_category=255,
            ),
            L(T.RandomFlip)(horizontal=True),
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
