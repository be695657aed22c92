"""The paper's backbone-only baseline at the tiny demo's size: MIM pre-training of the
HiViT encoder with NO pyramid (MAE's layout: the pixel decoder reads the encoder's
stride-16 output), otherwise ``configs/pretrain/mim_mfm_itpn_tiny_cpu.py``'s recipe
(data, schedule, pixel decoder width and depth) without MFM.

The checkpoint still holds ``backbone.pyramid.*`` (the model's backbone is the
detector's, pyramid included) but those weights are never trained: fine-tune with a
fresh pyramid,

    python tools/lazyconfig_train_net.py --config-file configs/pretrain/mim_backbone_only_itpn_tiny_cpu.py
    python tools/lazyconfig_train_net.py --config-file configs/COCO/mask_rcnn_itpn_tiny_demo.py \\
        train.init_checkpoint=output/pretrain/mim_backbone_only_itpn_tiny_cpu/model_final.pth \\
        train.backbone_load=encoder_only
"""
from .mim_mfm_itpn_tiny_cpu import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.use_pyramid = False
model.mfm_decoder = None
model.teacher = None
model.pixel_decoder.levels = (16,)
model.pixel_decoder.in_dim = "${..backbone.net.embed_dim}"  # f16 has the encoder's width
train.output_dir = "./output/pretrain/mim_backbone_only_itpn_tiny_cpu"
