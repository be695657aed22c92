"""Mask R-CNN with the iTPN backbone (HiViT + pre-trained pyramid) in place of FPN(ResNet).

Heads as in ViTDet / the iTPN detection recipe: 2-conv RPN head, 4conv1fc box head
and 4-conv mask head with LN (SyncBN in the paper needs a process group, LN runs
anywhere). Sizes come from ``hivit_arch``; a variant patches ``model.backbone.net``.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from itpn_d2.config.constants import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone, ROIPoolerFP32Boxes, hivit_arch

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model

model.pixel_mean = list(IMAGENET_PIXEL_MEAN)
model.pixel_std = list(IMAGENET_PIXEL_STD)
model.input_format = "RGB"

model.backbone = L(ITPNBackbone)(
    net=L(HiViT)(
        **hivit_arch("base", "official"),
        drop_path_rate=0.1,
        pretrain_img_size=224,
        use_act_checkpoint=False,
    ),
    # depth 2, as in pixel pre-training: the release's detection configs (sunsmarterjie/iTPN
    # det/configs/itpn/*.py) build the pyramid with fpn_depth=1 and load the depth-2 pixel checkpoint
    # non-strictly, so its second C-MLP per block is silently dropped; we load all of it.
    pyramid=L(FeaturePyramid)(embed_dim="${..net.embed_dim}", out_dim=256, depth=2),
    out_features=("p2", "p3", "p4", "p5", "p6"),
    square_pad=0,
)

model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "LN"
model.proposal_generator.head.conv_dims = [-1, -1]
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
# Under AMP the poolers keep the boxes in fp32: detectron2's cast them to the features' dtype, and bf16
# (train.amp.dtype=bfloat16) rounds coordinates to 1-px steps at 128-256 px, 2-px at 256-512, 4-px at
# 512-1024, 8-px beyond (itpn_d2/modeling/roi_pooler.py). Without autocast it is detectron2's ROIPooler exactly.
model.roi_heads.box_pooler._target_ = model.roi_heads.mask_pooler._target_ = ROIPoolerFP32Boxes
