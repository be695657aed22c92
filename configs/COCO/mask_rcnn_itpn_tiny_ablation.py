"""The detection recipe of the integral ablation (``tools/ablate_integral.py``, ``docs/ablation/``):
the demo's Mask R-CNN (``mask_rcnn_itpn_tiny_demo.py``) as it was when the 5-seed experiment ran,
1000 iterations with the lr steps at 800 and 930, 1000 / 500 training proposals per level before /
after NMS, and detectron2's ``ROIPooler`` (the same as the demo's ``ROIPoolerFP32Boxes`` without
autocast, and these runs are fp32).

The tool refuses a run folder whose saved recipe (its ``config.yaml`` outside ``train:``) differs
from what this file gives, so the committed runs stay reproducible and reusable: change the demo,
not this file.
"""
from detectron2.modeling.poolers import ROIPooler

from ..common.coco_schedule import step_schedule
from ..common.train_compile import train_compile  # noqa: F401  (a top-level key of the saved recipe)
from .mask_rcnn_itpn_tiny_demo import dataloader, model, optimizer, train

MAX_ITER = 1000

model.roi_heads.box_pooler._target_ = model.roi_heads.mask_pooler._target_ = ROIPooler
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (500, 200)
train.max_iter = MAX_ITER
# the committed runs' loaders (the demo now loads in-process; the images and the results are the same)
dataloader.train.num_workers = dataloader.test.num_workers = 2
train.eval_period = MAX_ITER
lr_multiplier = step_schedule(MAX_ITER, [int(0.8 * MAX_ITER), int(0.93 * MAX_ITER)], warmup_iters=MAX_ITER // 10)
