"""A tiny MIM + MFM (EMA teacher) run that trains on a laptop CPU in minutes, on the
generated ``itpn_synthetic_unlabeled`` images at 128 px (8x8 mask units). Its pyramid (64
channels, depth 2) and position-embedding size match ``configs/COCO/mask_rcnn_itpn_tiny_demo.py``,
which loads its checkpoint strictly. Its 500 iterations are the integral ablation's pre-training;
``make demo`` runs the same recipe for 700 (``mim_mfm_itpn_tiny_demo.py``).

    python tools/lazyconfig_train_net.py --config-file configs/pretrain/mim_mfm_itpn_tiny_cpu.py
"""
from detectron2.config import LazyCall as L

from .mim_itpn_base_800ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401
from ..common.pretrain_schedule import set_schedule
from itpn_d2.modeling import hivit_arch
from itpn_d2.modeling.decoder import LevelDecoder
from itpn_d2.modeling.teacher import EMATeacher

IMG = 128
model.backbone.net.update(hivit_arch("tiny", "official"))
model.backbone.net.pretrain_img_size = IMG
model.backbone.pyramid.out_dim = 64
model.pixel_decoder.update(dec_dim=64, depth=1, num_heads=4)
# MFM targets: the EMA encoder's f4/f8/f16 (HiViT-tiny widths 192/4, 192/2, 192) for p2/p3/p4,
# standardised per (position, channel) over the batch, then per token (model.mfm_target_norm).
model.mfm_decoder = L(LevelDecoder)(
    in_dim=64, out_dims=(48, 96, 192), dec_dim=64, depth=1, num_heads=4, pretrain_img_size=IMG
)
# Momentum 0.99 -> 1 (cosine over training): the teacher averages over ~1/(1-m) = 100 iterations,
# well inside a run of a few hundred; at 0.996 (250 iterations) a 150-iteration run's teacher
# barely leaves its random start and loss_mfm_p4 ends at 0.50 of the position-only line, not
# 0.35. The MFM weight rises linearly over the first 40 iterations: loss_mim after 150
# iterations 0.62 instead of 0.74 at the same MFM level (one seed each; docs/design.md, MFM).
model.teacher = L(EMATeacher)(momentum=0.99, end_momentum=1.0, max_iter=0, targets="encoder")
model.mfm_target_norm = "batch_token"
model.mfm_warmup_iters = 40

dataloader.train.dataset.names = "itpn_synthetic_unlabeled"
dataloader.train.mapper.image_size = IMG
dataloader.train.total_batch_size = 16
# In-process loading: on 2 cores, loader worker processes take CPU from the step's own threads, and a
# step took 0.19 s instead of 0.22 (idle 2-core Intel Xeon, 2026-12-05). The stream is a function of
# (seed, position) only (itpn_d2.data.resumable): the checkpoint is torch.equal either way. More cores: raise it.
dataloader.train.num_workers = 0

train.device = "cpu"
train.seed = 0  # a fixed seed: the demo (and its numbers in docs/main_job.md) can be reproduced
train.amp.enabled = False
train.output_dir = "./output/pretrain/mim_mfm_itpn_tiny_cpu"
train.checkpointer.period = 100
train.log_period = 20
set_schedule(
    optimizer, lr_multiplier, train, model=model,
    blr=1e-3 * 256 / 16, epochs=500, warmup_epochs=25, images_per_epoch=16,
)  # 500 iterations ("epochs" of one batch, under 2 min on 2 cores) at lr 1e-3: higher than ImageNet's blr so tiny runs move
