"""UPerNet semantic segmentation with the iTPN backbone (HiViT + pre-trained pyramid).

As the iTPN ADE20K recipe: each UPerNet level is the pyramid output concatenated
with the raw encoder feature of that stride (``ITPNSegBackbone``: p2..p5 and
c2..c5; stride 32 is max pooling of stride 16), 768-channel head, pool scales
(1, 2, 3, 6), auxiliary FCN head on the stride-16 level with weight 0.4. The
backbone keeps the pre-training pyramid depth (2), so every pre-trained
``backbone.pyramid.*`` tensor loads (the official code random-initialises some).
Sizes come from ``hivit_arch``; a variant patches ``model.backbone.net``.
"""

from detectron2.config import LazyCall as L
from detectron2.modeling import SemanticSegmentor

from itpn_d2.config.constants import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from itpn_d2.modeling.hivit import HiViT, hivit_arch
from itpn_d2.modeling.pyramid import FeaturePyramid
from itpn_d2.modeling.seg_backbone import ITPNSegBackbone, itpn_seg_output_shape
from itpn_d2.modeling.uper_head import UPerHead

model = L(SemanticSegmentor)(
    backbone=L(ITPNSegBackbone)(
        net=L(HiViT)(
            **hivit_arch("base", "official"),
            drop_path_rate=0.1,
            pretrain_img_size=224,
            use_act_checkpoint=False,
        ),
        pyramid=L(FeaturePyramid)(embed_dim="${..net.embed_dim}", out_dim=256, depth=2),
        out_features=("p2", "p3", "p4", "p5", "c2", "c3", "c4", "c5"),
    ),
    sem_seg_head=L(UPerHead)(
        input_shape=L(itpn_seg_output_shape)(
            embed_dim="${...backbone.net.embed_dim}",
            out_dim="${...backbone.pyramid.out_dim}",
            out_features="${...backbone.out_features}",
        ),
        in_features=[("p2", "c2"), ("p3", "c3"), ("p4", "c4"), ("p5", "c5")],
        num_classes=150,
        channels=768,
        pool_scales=(1, 2, 3, 6),
        # SyncBN as the reference (mmseg); on one process / CPU it is plain BN.
        norm="SyncBN",
        dropout=0.1,
        ignore_value=255,
        loss_weight=1.0,
        aux_in_feature=("p4", "c4"),
        aux_channels=256,
        aux_loss_weight=0.4,
    ),
    # the pre-training normalisation
    pixel_mean=list(IMAGENET_PIXEL_MEAN),
    pixel_std=list(IMAGENET_PIXEL_STD),
)
