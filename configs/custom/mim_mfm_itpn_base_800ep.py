"""Template: pre-train iTPN-B (MIM + MFM, backbone and pyramid together) on your own folder of images.

Copy this file, edit the names below, and run::

    python tools/lazyconfig_train_net.py --config-file configs/custom/my_pretrain.py

Every image under ``IMAGE_FOLDER`` (searched recursively; jpg, jpeg, png, bmp, webp, tif) is one
sample; no labels. ``itpn_d2.data.image_folder.register_image_folder`` scans the folder when the
run starts and names the folder if it is missing or empty; an unreadable image is skipped and
counted (``skipped_images`` in the metrics). The checkpoint it writes
(``OUTPUT_DIR/model_final.pth``) is the ``train.init_checkpoint`` of the fine-tuning templates:
encoder and pyramid load by exact name. Everything else is
``configs/pretrain/mim_mfm_itpn_base_800ep.py``.
"""
from detectron2.data import DatasetCatalog

from itpn_d2.data.image_folder import register_image_folder

from ..common.pretrain_schedule import set_schedule
from ..pretrain.mim_mfm_itpn_base_800ep import dataloader, lr_multiplier, model, optimizer, train

# --- edit these -------------------------------------------------------------------------------
IMAGE_FOLDER = "/data/my_unlabeled_images"
NUM_IMAGES = 100_000  # how many images the folder holds: an epoch's length
EPOCHS = 800
OUTPUT_DIR = "./output/my_pretrain"
# -----------------------------------------------------------------------------------------------

if "my_images_unlabeled" not in DatasetCatalog.list():
    register_image_folder("my_images_unlabeled", IMAGE_FOLDER)
dataloader.train.dataset.names = "my_images_unlabeled"
train.output_dir = OUTPUT_DIR
# The release's schedule (blr 1.5e-4 x batch / 256, 5 % of the epochs linear warm-up), over your data;
# the batch stays 4096 (set dataloader.train.total_batch_size=... on the command line: lr follows).
set_schedule(
    optimizer, lr_multiplier, train, model=model,
    blr=1.5e-4, epochs=EPOCHS, warmup_epochs=EPOCHS / 20, images_per_epoch=NUM_IMAGES,
)
