"""Mask R-CNN, iTPN-L (HiViT-L 2/2/40 + pyramid), COCO 1x, per image.

The release's "L 1x" row (sunsmarterjie/iTPN ``det/configs/itpn/clip_itpn_large_1x_ld095_dp020.py``):
lr 2e-4 at 64 images, layer decay 0.95 over ``num_layers=44`` (+2 = 46 = ``len(blocks)``; rule
``release_det``), drop path 0.2; everything else as the base 1x config. Reference results:
55.6 / 48.6 (pixel pre-training), 55.2 / 48.2 (CLIP-L teacher). Activation checkpointing is on:
the 40 global-attention blocks at 1333-px inputs do not fit otherwise.

For a CLIP-supervised checkpoint (relative position bias and layer-scale in every attention
block, as that release file: ``rpe=True, init_values=0.1``) also set
``model.backbone.net.rel_pos=True model.backbone.net.layer_scale_init=0.1``; strict loading
refuses the file otherwise and lists the keys.
"""
from itpn_d2.modeling import hivit_arch

from .mask_rcnn_itpn_base_1x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.update(hivit_arch("large", "official"))
model.backbone.net.drop_path_rate = 0.2
model.backbone.net.use_act_checkpoint = True
train.init_checkpoint = "checkpoints/itpn_large_pretrain.pth"  # placeholder
optimizer.params.lr_factor_func.lr_decay_rate = 0.95
