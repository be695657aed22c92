"""Mask R-CNN, iTPN-B (HiViT-B 3/3/24 + pyramid), COCO 1x: the release's "pixel B 1x" recipe, per image.

As sunsmarterjie/iTPN ``det/configs/itpn/pixel_itpn_base_1x_ld090_dp005.py``: AdamW lr 2e-4 at
64 images per batch, betas (0.9, 0.999), wd 0.05, layer decay 0.90 with the release's
constructor (``itpn_d2/lr_decay.py``, rule ``release_det``), drop path 0.05, DETR-style
multi-scale training, 4conv1fc box head with GIoU loss x10, 12 epochs with x0.1 steps at
epochs 9 and 11, 500 warm-up iterations (at 64 images), AMP. Reference result (paper,
1600-epoch pixel pre-training): 53.0 box AP / 46.5 mask AP.

The schedule is per image (``configs/common/coco_schedule.py``): lr, iterations, warm-up, LR
steps and eval / checkpoint periods follow ``dataloader.train.total_batch_size`` (default 64, the
release's). On 8 GPUs x 2 images::

    python tools/lazyconfig_train_net.py --num-gpus 8 --config-file configs/COCO/mask_rcnn_itpn_base_1x.py \
        dataloader.train.total_batch_size=16 train.init_checkpoint=/path/to/itpn_base_pretrain.pth

trains at lr 5e-5 for 87,948 iterations (2,000 warm-up), with no other edit.

Weights: ``train.init_checkpoint`` is a placeholder. Point it at an itpn_d2 pre-training
checkpoint (``configs/pretrain``) or at a converted official / mmpretrain file
(``tools/convert_pretrained.py``). It is loaded by ``itpn_d2.checkpoint.ITPNCheckpointer`` with
``train.backbone_load``: "strict" (every encoder and pyramid tensor must be in the file, with the
right shape), "encoder_only" (pyramid left at its init, for the ablation), or "partial".

Differences from the release (docs/recipes.md): pyramid depth 2 (the release builds
1 and silently drops half of the pre-trained pyramid), LN instead of SyncBN in the box / mask
heads, detectron2's RPN / ROI sampling defaults.
"""
from detectron2 import model_zoo

from ..common.coco_schedule import set_coco_schedule
from ..common.data.coco import dataloader
from ..common.models.mask_rcnn_itpn import model
from ..common.optim import AdamW as optimizer
from ..common.train_compile import train_compile

train = model_zoo.get_config("common/train.py").train
train.compile = train_compile
train.init_checkpoint = "checkpoints/itpn_base_pretrain.pth"  # placeholder: set on the command line
train.backbone_load = "strict"
train.amp.enabled = True
train.ddp.fp16_compression = True

model.backbone.net.drop_path_rate = 0.05
# GIoU on decoded boxes, weight 10 (the reference's GIoULoss(loss_weight=10.0)).
model.roi_heads.box_predictor.box_reg_loss_type = "giou"
model.roi_heads.box_predictor.loss_weight = {"loss_box_reg": 10.0}

optimizer.params.lr_factor_func.lr_decay_rate = 0.90
lr_multiplier = set_coco_schedule(train, optimizer, lr=2e-4, epochs=12, step_epochs=(9, 11))
