"""Template: fine-tune iTPN-B Faster R-CNN on your own COCO-format boxes (no masks).

Copy this file, edit the names below, and run::

    python tools/lazyconfig_train_net.py --config-file configs/custom/my_faster_rcnn.py \
        train.init_checkpoint=/path/to/itpn_base_pretrain.pth

The json needs ``images``, ``annotations`` with ``bbox`` (XYWH) and ``category_id``, and
``categories``; no ``segmentation``. The mask branch is removed and the mapper does not ask for
masks (``configs/COCO/faster_rcnn_itpn_base_1x.py``); COCOEvaluator reports box AP.
"""
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from ..common.coco_schedule import set_coco_schedule
from ..COCO.faster_rcnn_itpn_base_1x import dataloader, model, optimizer, train

# --- edit these -------------------------------------------------------------------------------
TRAIN_JSON = "/data/my_boxes/annotations/train.json"
VAL_JSON = "/data/my_boxes/annotations/val.json"
IMAGE_ROOT = "/data/my_boxes/images"
NUM_CLASSES = 3  # number of entries in the json's "categories"
NUM_TRAIN_IMAGES = 5000  # images with at least one annotation: an epoch's length
OUTPUT_DIR = "./output/my_faster_rcnn"
# -----------------------------------------------------------------------------------------------

for _name, _json in (("my_boxes_train", TRAIN_JSON), ("my_boxes_val", VAL_JSON)):
    if _name not in DatasetCatalog.list():
        register_coco_instances(_name, {}, _json, IMAGE_ROOT)

dataloader.train.dataset.names = "my_boxes_train"
dataloader.test.dataset.names = "my_boxes_val"
model.roi_heads.num_classes = NUM_CLASSES
train.output_dir = OUTPUT_DIR
# The release's 1x schedule (12 epochs, x0.1 at epochs 9 and 11, lr 2e-4 at 64 images) over your
# data; lr, iterations and warm-up follow dataloader.train.total_batch_size (a small dataset wants
# a smaller batch, e.g. dataloader.train.total_batch_size=16 on the command line).
lr_multiplier = set_coco_schedule(train, optimizer, lr=2e-4, epochs=12, step_epochs=(9, 11),
                                  images_per_epoch=NUM_TRAIN_IMAGES)
