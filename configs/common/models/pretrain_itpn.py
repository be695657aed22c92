"""iTPN pixel pre-training model (MIM), the release's base layout by default.

``model.backbone`` has the same structure and names as Mask R-CNN's
(``configs/common/models/mask_rcnn_itpn.py``), pyramid depth 2 included, so the
``backbone.*`` weights of a pre-training checkpoint load into the detector by name.
Variants patch ``model.backbone.net`` (size / layout), ``model.pixel_decoder.depth``
(8 official, 6 mmpretrain), or add ``model.mfm_decoder`` + ``model.teacher``.
"""
from detectron2.config import LazyCall as L

from itpn_d2.config.constants import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone, hivit_arch
from itpn_d2.modeling.decoder import PixelDecoder
from itpn_d2.modeling.masking import RandomMaskGenerator
from itpn_d2.modeling.pretrainer import MaskedPretrainer

model = L(MaskedPretrainer)(
    backbone=L(ITPNBackbone)(
        net=L(HiViT)(
            **hivit_arch("base", "official"),
            drop_path_rate=0.0,
            pretrain_img_size=224,
            pos_embed_trainable=True,  # the release trains it; mmpretrain freezes it
            use_act_checkpoint=False,
        ),
        pyramid=L(FeaturePyramid)(embed_dim="${..net.embed_dim}", out_dim=256, depth=2),
        out_features=("p2", "p3", "p4"),
    ),
    pixel_decoder=L(PixelDecoder)(
        in_dim="${..backbone.pyramid.out_dim}",
        dec_dim=512,
        depth=8,
        num_heads=16,
        mlp_ratio=4.0,
        pretrain_img_size="${..backbone.net.pretrain_img_size}",
    ),
    mfm_decoder=None,
    teacher=None,
    mask_generator=L(RandomMaskGenerator)(),
    mask_ratio=0.75,
    # 0-255 RGB: the mapper yields RGB, as detectron2's "RGB" format
    pixel_mean=list(IMAGENET_PIXEL_MEAN),
    pixel_std=list(IMAGENET_PIXEL_STD),
    mim_weights=1.0,
    mfm_weights=(1.0, 1.0, 1.0),
    norm_pix_loss=True,
    mfm_loss="smooth_l1",
    mfm_target_norm="batch_token",
    mfm_warmup_iters=0,
    use_pyramid=True,
)
