"""iTPN-L pixel pre-training (MIM only): HiViT-L 2/2/40 (release layout), 800 epochs."""
from .mim_itpn_base_800ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401
from itpn_d2.modeling import hivit_arch

model.backbone.net.update(hivit_arch("large", "official"))
model.backbone.net.use_act_checkpoint = True
train.output_dir = "./output/pretrain/mim_itpn_large_800ep"
