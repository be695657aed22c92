"""Detection only (no masks): iTPN-B Faster R-CNN, COCO 1x recipe.

For box-only datasets: the mask branch is removed and the data mapper does not ask for
instance masks (detectron2 issue #4416: ViTDet on detection-only data still demanding
masks). Everything else is ``mask_rcnn_itpn_base_1x.py``. ``COCOEvaluator`` then reports
bbox AP only. A custom COCO-format dataset is one line each::

    dataloader.train.dataset.names = "my_train"; dataloader.test.dataset.names = "my_val"
    model.roi_heads.num_classes = K
"""
from .mask_rcnn_itpn_base_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.mask_in_features = None
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = None
dataloader.train.mapper.use_instance_mask = False
