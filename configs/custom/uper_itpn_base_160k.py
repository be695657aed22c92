"""Template: fine-tune the iTPN-B UPerNet segmenter on your own semantic-segmentation folders.

Copy this file, edit the names below, and run::

    python tools/lazyconfig_train_net.py --config-file configs/custom/my_segmenter.py \
        train.init_checkpoint=/path/to/itpn_base_pretrain.pth

Layout: images and single-channel PNG label maps with the same file stem, e.g.
``images/train/0001.jpg`` + ``labels/train/0001.png``, each label pixel a class index
0..K-1 (the order of ``CLASS_NAMES``) or 255 to ignore. detectron2's ``load_sem_seg`` pairs them;
``SemSegEvaluator`` reports mIoU over ``CLASS_NAMES``. Everything else (the release's ADE20K
recipe: crops, schedule, layer decay) is ``configs/ADE20K/uper_itpn_base_160k.py``; with images
much smaller than 512 px, lower the crop and window sizes there too.
"""
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg

from ..ADE20K.uper_itpn_base_160k import dataloader, lr_multiplier, model, optimizer, train

# --- edit these -------------------------------------------------------------------------------
IMAGE_DIRS = {"train": "/data/my_seg/images/train", "val": "/data/my_seg/images/val"}
LABEL_DIRS = {"train": "/data/my_seg/labels/train", "val": "/data/my_seg/labels/val"}
IMAGE_EXT = "jpg"
LABEL_EXT = "png"
CLASS_NAMES = ["background", "road", "car"]  # label value i is CLASS_NAMES[i]
OUTPUT_DIR = "./output/my_segmenter"
# -----------------------------------------------------------------------------------------------


def _register(name: str, split: str) -> None:
    if name in DatasetCatalog.list():  # a config file can be loaded twice in one process
        return
    images, labels = IMAGE_DIRS[split], LABEL_DIRS[split]
    DatasetCatalog.register(
        name, lambda: load_sem_seg(labels, images, gt_ext=LABEL_EXT, image_ext=IMAGE_EXT)
    )
    MetadataCatalog.get(name).set(
        stuff_classes=list(CLASS_NAMES), ignore_label=255, evaluator_type="sem_seg",
        image_root=images, sem_seg_root=labels,
    )


_register("my_sem_seg_train", "train")
_register("my_sem_seg_val", "val")
dataloader.train.dataset.names = "my_sem_seg_train"
dataloader.test.dataset.names = "my_sem_seg_val"  # the evaluator follows
model.sem_seg_head.num_classes = len(CLASS_NAMES)
train.output_dir = OUTPUT_DIR
