"""mmpretrain's iTPN-B pixel layout (HiViT 4/4/24, frozen sin-cos position embedding,
6-block decoder): 102.68M parameters, as mmpretrain's config counts."""
from .mim_itpn_base_800ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401
from itpn_d2.modeling import hivit_arch

model.backbone.net.update(hivit_arch("base", "mmpretrain"))
model.backbone.net.pos_embed_trainable = False
model.pixel_decoder.depth = 6
train.output_dir = "./output/pretrain/mim_itpn_base_mmpretrain_800ep"
