"""Pre-training optimizer and LR schedule (MAE / iTPN recipe).

AdamW, betas (0.9, 0.95), weight decay 0.05 except on norms, biases, position
embeddings, mask tokens, level embeddings, relative-position tables and layer-scale
(1-D parameters, as MAE's ``param_groups_weight_decay``); frozen parameters
(the fixed decoder position embedding, the teacher) are left out by
``get_default_optimizer_params``. lr = blr * total_batch / 256; linear warm-up then
cosine to 0, per iteration.

A recipe sets ``dataloader.train.total_batch_size`` and calls :func:`set_schedule`, which fills
``optimizer.lr``, ``train.max_iter``, the warm-up length and a teacher's momentum schedule.
lr and max_iter are interpolations of the batch (``itpn_d2.schedule``), resolved after the
command-line overrides: ``dataloader.train.total_batch_size=1024`` on the 800-epoch config trains
800 epochs (4 x the iterations) at a quarter of the lr, with the same 40 warm-up epochs.
"""
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import CosineParamScheduler
import torch

from itpn_d2.schedule import iters_for_epochs, lr_at_batch

NO_DECAY = ("absolute_pos_embed", "mask_token", "level_embed", "relative_position_bias_table", "gamma_1", "gamma_2")

optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # params.model is filled by the training script (model=model)
        weight_decay_norm=0.0,
        weight_decay_bias=0.0,
        overrides={name: {"weight_decay": 0.0} for name in NO_DECAY},
    ),
    lr=1.5e-4 * 4096 / 256,
    betas=(0.9, 0.95),
    weight_decay=0.05,
    # one fused kernel instead of ~10 small ops per tensor: AdamW fell from 10% to 2.5% of a
    # CPU pre-training step (tools/benchmark.py --profile); same algorithm.
    fused=True,
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=40 / 800,
    warmup_method="linear",
    warmup_factor=0.0,
)


def set_schedule(optimizer, lr_multiplier, train, *, blr, epochs, warmup_epochs, images_per_epoch, model=None):
    """lr = ``blr`` * batch / 256; ``epochs`` epochs of ``images_per_epoch`` images (ImageNet-1k:
    1,281,167), the first ``warmup_epochs`` a linear warm-up. The batch is
    ``dataloader.train.total_batch_size`` (times ``train.grad_accum_steps``) when the config is read."""
    train.max_iter = iters_for_epochs(epochs, images_per_epoch)
    optimizer.lr = lr_at_batch(blr, 256)
    # a fraction of training: independent of the batch
    lr_multiplier.warmup_length = warmup_epochs / epochs
    if model is not None and model.get("teacher") is not None and "max_iter" in model.teacher:
        # an interpolation, so a command-line train.max_iter=... also moves the momentum schedule
        model.teacher.max_iter = "${train.max_iter}"
