"""Mask R-CNN, iTPN-B, COCO 3x: 36 epochs, x0.1 steps at epochs 27 and 33, per image.

The release's "B 3x" row (sunsmarterjie/iTPN ``det/configs/itpn/pixel_itpn_base_3x_ld090_dp030.py``):
lr 1.5e-4 at 64 images, layer decay 0.90 (rule ``release_det``), drop path 0.30; everything else
as the 1x config. Reference result (pixel pre-training): 54.0 box AP / 47.4 mask AP.
(That released file sets ``max_epochs=12, step=[9, 11]`` despite its name; we follow the name,
the paper's 3x row and the release's cascade 3x files: 36 epochs, steps [27, 33].)
"""
from ..common.coco_schedule import set_coco_schedule
from .mask_rcnn_itpn_base_1x import dataloader, model, optimizer, train

model.backbone.net.drop_path_rate = 0.30
optimizer.params.lr_factor_func.lr_decay_rate = 0.90
lr_multiplier = set_coco_schedule(train, optimizer, lr=1.5e-4, epochs=36, step_epochs=(27, 33))
