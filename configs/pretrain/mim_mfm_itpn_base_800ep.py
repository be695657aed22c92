"""iTPN-B integral pre-training with both objectives: MIM (pixels, the release's
decoder) + MFM against an EMA teacher (momentum 0.996 -> 1 over training, cosine),
each pyramid level (p2/p3/p4 = strides 4/8/16) predicting the teacher *encoder's* feature
of the same stride (f4/f8/f16, the paper's "moving-averaged backbone") at masked units,
standardised per (position, channel) over the batch and then per token."""
from detectron2.config import LazyCall as L

from .mim_itpn_base_800ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401
from itpn_d2.modeling.decoder import LevelDecoder
from itpn_d2.modeling.teacher import EMATeacher

_D = 256  # pyramid width
_C = 512  # HiViT-B width: the EMA encoder's f4, f8, f16 have C/4, C/2, C channels
model.mfm_decoder = L(LevelDecoder)(
    in_dim=_D, out_dims=(_C // 4, _C // 2, _C), dec_dim=256, depth=2, num_heads=8, pretrain_img_size=224
)
model.teacher = L(EMATeacher)(momentum=0.996, end_momentum=1.0, max_iter="${train.max_iter}", targets="encoder")
model.mfm_target_norm = "batch_token"
model.mfm_weights = (1.0, 1.0, 1.0)
model.mfm_loss = "smooth_l1"
train.output_dir = "./output/pretrain/mim_mfm_itpn_base_800ep"
