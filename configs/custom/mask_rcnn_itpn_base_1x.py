"""Template: fine-tune iTPN-B Mask R-CNN on your own COCO-format instances.

Copy this file, edit the five names below, and run::

    python tools/lazyconfig_train_net.py --config-file configs/custom/my_mask_rcnn.py \
        train.init_checkpoint=/path/to/itpn_base_pretrain.pth

Your json is COCO's: ``images``, ``annotations`` (``bbox`` as XYWH, ``segmentation`` as polygons
or RLE), ``categories``. detectron2's ``register_coco_instances`` reads it; category ids may be any
integers (detectron2 maps them to 0..K-1 in id order, and COCOEvaluator maps them back), and the
class names come from the json's ``categories``. Boxes only, no masks: use
``configs/custom/faster_rcnn_itpn_base_1x.py``. Everything else (recipe, schedule per image,
layer decay) is ``configs/COCO/mask_rcnn_itpn_base_1x.py``.
"""
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from ..common.coco_schedule import set_coco_schedule
from ..COCO.mask_rcnn_itpn_base_1x import dataloader, model, optimizer, train

# --- edit these -------------------------------------------------------------------------------
TRAIN_JSON = "/data/my_dataset/annotations/train.json"
VAL_JSON = "/data/my_dataset/annotations/val.json"
IMAGE_ROOT = "/data/my_dataset/images"  # file_name in the json is relative to this folder
NUM_CLASSES = 3  # number of entries in the json's "categories"
NUM_TRAIN_IMAGES = 5000  # images with at least one annotation: an epoch's length
OUTPUT_DIR = "./output/my_mask_rcnn"
# -----------------------------------------------------------------------------------------------

# A config file can be loaded twice in one process (a tool, then the trainer): register once.
for _name, _json in (("my_instances_train", TRAIN_JSON), ("my_instances_val", VAL_JSON)):
    if _name not in DatasetCatalog.list():
        register_coco_instances(_name, {}, _json, IMAGE_ROOT)

dataloader.train.dataset.names = "my_instances_train"
dataloader.test.dataset.names = "my_instances_val"  # the evaluator follows (${..test.dataset.names})
# Bitmasks read polygons and RLE alike (detectron2's default "polygon" rejects RLE).
dataloader.train.mapper.instance_mask_format = "bitmask"
model.roi_heads.num_classes = NUM_CLASSES  # the box predictor and mask head follow
train.output_dir = OUTPUT_DIR
# The release's 1x schedule (12 epochs, x0.1 at epochs 9 and 11, lr 2e-4 at 64 images) over your
# data; lr, iterations and warm-up follow dataloader.train.total_batch_size (a small dataset wants
# a smaller batch, e.g. dataloader.train.total_batch_size=16 on the command line).
lr_multiplier = set_coco_schedule(train, optimizer, lr=2e-4, epochs=12, step_epochs=(9, 11),
                                  images_per_epoch=NUM_TRAIN_IMAGES)
