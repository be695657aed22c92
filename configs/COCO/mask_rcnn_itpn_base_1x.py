"""Mask R-CNN, iTPN-B (HiViT-B 3/3/24 + pyramid), COCO 1x (90k iterations at 16 images).

The reference's "pixel B 1x" row: AdamW lr 2e-4, betas (0.9, 0.999), wd 0.05, layer decay
0.90, drop path 0.05, DETR-style multi-scale training, 4conv1fc box head with GIoU loss x10,
step schedule (steps at 9/12 and 11/12) with 500 warm-up iterations. Reference result
(paper, 1600-epoch pixel pre-training): 53.0 box AP / 46.5 mask AP.

Weights: ``train.init_checkpoint`` is a placeholder. Point it at an itpn_d2 pre-training
checkpoint (``configs/pretrain``) or at a converted official / mmpretrain file
(``tools/convert_pretrained.py``)::

    python tools/lazyconfig_train_net.py --config-file configs/COCO/mask_rcnn_itpn_base_1x.py \
        train.init_checkpoint=/path/to/itpn_base_pretrain.pth

It is loaded by ``itpn_d2.checkpoint.load_pretrained`` with ``train.backbone_load``:
"strict" (every encoder and pyramid tensor must be in the file, with the right shape),
"encoder_only" (pyramid left at its init, for the ablation), or "partial".
"""
from detectron2 import model_zoo

from ..common.coco_schedule import lr_multiplier_1x as lr_multiplier
from ..common.data.coco import dataloader
from ..common.models.mask_rcnn_itpn import model
from ..common.optim import AdamW as optimizer
from ..common.train_compile import train_compile

train = model_zoo.get_config("common/train.py").train
train.compile = train_compile
train.init_checkpoint = "checkpoints/itpn_base_pretrain.pth"  # placeholder: set on the command line
train.backbone_load = "strict"
train.max_iter = 90000
train.amp.enabled = True
train.ddp.fp16_compression = True
train.checkpointer.period = 5000
train.eval_period = 10000

model.backbone.net.drop_path_rate = 0.05
# GIoU on decoded boxes, weight 10 (the reference's GIoULoss(loss_weight=10.0)).
model.roi_heads.box_predictor.box_reg_loss_type = "giou"
model.roi_heads.box_predictor.loss_weight = {"loss_box_reg": 10.0}

optimizer.lr = 2e-4
optimizer.params.lr_factor_func.lr_decay_rate = 0.90
