"""iTPN-B pixel pre-training with per-level supervision (ours): every pyramid level
reconstructs the normalised pixels it covers (stride-4 tokens 4x4x3, stride-8 8x8x3,
stride-16 16x16x3) through a shared 2-block decoder and its own head, one loss per
level (``loss_mim_p2/p3/p4``), instead of the release's fused 8-block decoder."""
from detectron2.config import LazyCall as L

from .mim_itpn_base_800ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401
from itpn_d2.modeling.decoder import LevelDecoder

model.pixel_decoder = L(LevelDecoder)(
    in_dim=256, out_dims=(4 * 4 * 3, 8 * 8 * 3, 16 * 16 * 3), dec_dim=512, depth=2, num_heads=16,
    pretrain_img_size=224,
)
model.mim_weights = (1.0, 1.0, 1.0)
train.output_dir = "./output/pretrain/mim_levels_itpn_base_800ep"
