"""iTPN-B with a frozen CLIP teacher (the release's CLIP variant, without its leak):
MFM only, as the release (no pixel decoder), where every pyramid level predicts CLIP ViT-B/16 patch features
(``ln_post @ proj``, 512-d) resized to its stride. Block-wise masking 75/196 units
(dropped before stage 1 like random masking), drop path 0.1, layer-scale 0.1,
relative position bias, colour jitter 0.4, RRC(0.08, 1), 300 epochs at batch 2048,
lr 1.5e-3, betas (0.9, 0.98), 5 warm-up epochs.

The teacher weights are read from a local file; nothing is downloaded:
    python tools/lazyconfig_train_net.py --config-file configs/pretrain/mim_clip_itpn_base_300ep.py \
        model.teacher.weights=/path/to/open_clip_vit_b16.bin
"""
from detectron2.config import LazyCall as L

from .mim_itpn_base_800ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401
from ..common.pretrain_schedule import set_schedule
from itpn_d2.modeling.decoder import LevelDecoder
from itpn_d2.modeling.masking import BlockMaskGenerator
from itpn_d2.modeling.teacher import ExternalTeacher

model.backbone.net.drop_path_rate = 0.1
model.backbone.net.layer_scale_init = 0.1
model.backbone.net.rel_pos = True
model.mask_generator = L(BlockMaskGenerator)(min_block=16, min_aspect=0.3)
model.mask_ratio = 75 / 196

CLIP_DIM = 512
model.teacher = L(ExternalTeacher)(
    model_name="vit_base_patch16_clip_224",
    weights="",  # set to a local CLIP ViT-B/16 weights file
    student_pixel_mean="${..pixel_mean}",
    student_pixel_std="${..pixel_std}",
    mean=None,  # timm's CLIP mean/std
    std=None,
    project=True,
    model_kwargs={"num_classes": CLIP_DIM},
    config_key="model.teacher.weights",
)
model.mfm_decoder = L(LevelDecoder)(
    in_dim=256, out_dims=(CLIP_DIM,) * 3, dec_dim=256, depth=2, num_heads=8, pretrain_img_size=224
)
model.mfm_loss = "smooth_l1"
# per-token targets, as before; the mfm_posonly_* meter in metrics.json shows how much of
# them is the same for every image (model.mfm_target_norm="batch_token" removes it)
model.mfm_target_norm = "token"
model.pixel_decoder = None

dataloader.train.total_batch_size = 2048
dataloader.train.mapper.scale = (0.08, 1.0)
dataloader.train.mapper.color_jitter = 0.4
optimizer.betas = (0.9, 0.98)
set_schedule(
    optimizer, lr_multiplier, train, model=model,
    blr=1.5e-3 * 256 / 2048, epochs=300, warmup_epochs=5, images_per_epoch=1281167,
)
lr_multiplier.scheduler.end_value = "${itpn.div:1e-5,${optimizer.lr}}"  # cosine to lr 1e-5 at any batch
train.output_dir = "./output/pretrain/mim_clip_itpn_base_300ep"
