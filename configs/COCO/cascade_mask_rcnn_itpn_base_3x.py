"""Cascade Mask R-CNN, iTPN-B (pixel pre-training), COCO 3x, per image.

As sunsmarterjie/iTPN ``det/configs/itpn/cascade_pixel_itpn_base_3x.py``: three box stages with
IoU thresholds 0.5 / 0.6 / 0.7 and box-delta weights (10, 10, 5, 5) / (20, 20, 10, 10) /
(30, 30, 15, 15) (mmdet's ``target_stds`` 0.1/0.2, 0.05/0.1, 0.033/0.067), each a 4conv1fc
head with GIoU loss x10; 4-conv mask head; AdamW lr 1e-4 at 64 images, wd 0.05, layer decay
0.90 (rule ``release_det``, ``num_layers=30``), drop path 0.2, 36 epochs with steps at 27 and 33,
500 warm-up iterations at 64 images; the 1x config's DETR-style augmentation. Paper: 56.0 box AP
/ 48.5 mask AP.

Differences from the release: detectron2's ``CascadeROIHeads`` regresses class-agnostic boxes
(the release's heads are class-specific, ``reg_class_agnostic=False``) and weighs the stages by
scaling each head's input gradient by 1/3 (mmdet: stage loss weights 1, 0.5, 0.25); LN instead of
SyncBN in the heads; pyramid depth 2 (the release builds 1 and drops half the pre-trained pyramid).
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from ..common.coco_schedule import set_coco_schedule
from .mask_rcnn_itpn_base_1x import dataloader, model, optimizer, train

# arguments that do not exist for Cascade R-CNN (as detectron2's ViTDet cascade configs)
[model.roi_heads.pop(k) for k in ["box_head", "box_predictor", "proposal_matcher"]]
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="LN",
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
            box_reg_loss_type="giou",
            loss_weight={"loss_box_reg": 10.0},
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False) for th in [0.5, 0.6, 0.7]
    ],
)

model.backbone.net.drop_path_rate = 0.2
optimizer.params.lr_factor_func.lr_decay_rate = 0.90
lr_multiplier = set_coco_schedule(train, optimizer, lr=1e-4, epochs=36, step_epochs=(27, 33))
