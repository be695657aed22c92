"""Schedules computed from the batch when the config is *used*, not when it is loaded.

A recipe states its schedule per image (lr at a reference batch, epochs, warm-up in
images) and the numbers a run needs (``optimizer.lr``, ``train.max_iter``, the LR
multiplier's warm-up and steps, checkpoint / evaluation periods) are OmegaConf
interpolations of ``dataloader.train.total_batch_size``. They are resolved when read,
i.e. after the command-line overrides, so::

    python tools/lazyconfig_train_net.py --config-file configs/COCO/mask_rcnn_itpn_base_1x.py \
        dataloader.train.total_batch_size=16

trains at lr 5e-5 for 12 epochs of iterations at 16 images, with the warm-up and the LR
steps moved with it; nothing else to edit. A number given on the command line
(``train.max_iter=1000``, ``optimizer.lr=1e-4``) replaces the interpolation and wins.

The effective batch is ``total_batch_size * train.grad_accum_steps`` (1 when the key is
absent): one iteration is one optimizer step over the effective batch.

Resolvers (registered on import; ``itpn_d2`` imports this module):

* ``${itpn.lr:LR,REF_BATCH,BATCH,ACCUM}``: ``LR * BATCH * ACCUM / REF_BATCH`` (linear scaling).
* ``${itpn.epoch_iters:EPOCHS,IMAGES_PER_EPOCH,BATCH,ACCUM}``:
  ``EPOCHS * (IMAGES_PER_EPOCH // (BATCH * ACCUM))`` (an epoch drops its last partial batch).
* ``${itpn.image_iters:IMAGES,BATCH,ACCUM}``: ``max(1, round(IMAGES / (BATCH * ACCUM)))``.
* ``${itpn.div:A,B}``: ``A / B`` (e.g. a final lr as a fraction of a batch-dependent lr).

The helpers below write these strings, so configs read like the recipe.
"""
from typing import Sequence

from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler, PolynomialDecayParamScheduler
from omegaconf import OmegaConf

__all__ = [
    "BATCH",
    "ACCUM",
    "scaled_lr",
    "epoch_iters",
    "image_iters",
    "lr_at_batch",
    "iters_for_epochs",
    "iters_for_images",
    "step_lr_multiplier",
    "poly_lr_multiplier",
    "register_resolvers",
]

# Absolute interpolations: every config of this project has these at its root.
BATCH = "${dataloader.train.total_batch_size}"
ACCUM = "${oc.select:train.grad_accum_steps,1}"


def _eff(batch, accum) -> int:
    b = int(batch) * int(accum)
    if b <= 0:
        raise ValueError(
            f"dataloader.train.total_batch_size * train.grad_accum_steps must be positive; got {batch} * {accum}"
        )
    return b


def scaled_lr(lr, ref_batch, batch, accum=1) -> float:
    """Linear scaling: ``lr`` was the recipe's value at ``ref_batch`` images per step."""
    return float(lr) * _eff(batch, accum) / float(ref_batch)


def epoch_iters(epochs, images_per_epoch, batch, accum=1) -> int:
    """Iterations of ``epochs`` passes over ``images_per_epoch`` images (last partial batch dropped)."""
    per_epoch = int(images_per_epoch) // _eff(batch, accum)
    if per_epoch < 1:
        raise ValueError(
            f"an epoch of {images_per_epoch} images holds no full batch of {_eff(batch, accum)} "
            "(dataloader.train.total_batch_size * train.grad_accum_steps)"
        )
    return int(round(float(epochs) * per_epoch))


def image_iters(images, batch, accum=1) -> int:
    """Iterations that see ``images`` images (at least 1)."""
    return max(1, int(round(float(images) / _eff(batch, accum))))


def register_resolvers() -> None:
    """Register the ``itpn.*`` resolvers (idempotent)."""
    OmegaConf.register_new_resolver("itpn.lr", scaled_lr, replace=True)
    OmegaConf.register_new_resolver("itpn.epoch_iters", epoch_iters, replace=True)
    OmegaConf.register_new_resolver("itpn.image_iters", image_iters, replace=True)
    OmegaConf.register_new_resolver("itpn.div", lambda a, b: float(a) / float(b), replace=True)


register_resolvers()


def _num(x) -> str:
    return repr(float(x)) if isinstance(x, float) else str(int(x))


def lr_at_batch(lr: float, ref_batch: int) -> str:
    """``optimizer.lr`` value: ``lr`` at ``ref_batch`` images, scaled to the configured batch."""
    return f"${{itpn.lr:{_num(lr)},{_num(ref_batch)},{BATCH},{ACCUM}}}"


def iters_for_epochs(epochs, images_per_epoch: int) -> str:
    """``train.max_iter`` (or a period) value for ``epochs`` epochs at the configured batch."""
    return f"${{itpn.epoch_iters:{_num(epochs)},{_num(images_per_epoch)},{BATCH},{ACCUM}}}"


def iters_for_images(images: int) -> str:
    """An iteration count that sees ``images`` images at the configured batch
    (e.g. a warm-up given by the release in iterations at its batch: ``500 * 64``)."""
    return f"${{itpn.image_iters:{_num(images)},{BATCH},{ACCUM}}}"


def _check_warmup(warmup_iters: int, max_iter: int) -> float:
    if max_iter <= 0:
        raise ValueError(f"train.max_iter must be positive, got {max_iter}")
    return min(1.0, warmup_iters / max_iter)


def step_lr_multiplier(
    *,
    max_iter: int,
    epochs: float,
    step_epochs: Sequence[float],
    warmup_iters: int,
    warmup_factor: float = 0.001,
    gamma: float = 0.1,
) -> WarmupParamScheduler:
    """mmdet's ``lr_config=dict(policy='step', step=step_epochs, warmup='linear')`` as a
    detectron2 LR multiplier: x``gamma`` after each of ``step_epochs`` (of ``epochs``), placed at
    the same fraction of ``max_iter`` (so a shortened ``train.max_iter`` keeps the shape), after a
    linear warm-up from ``warmup_factor`` over ``warmup_iters`` iterations."""
    max_iter = int(max_iter)
    milestones = [int(round(float(e) / float(epochs) * max_iter)) for e in step_epochs]
    if any(not 0 < m < max_iter for m in milestones) or milestones != sorted(set(milestones)):
        raise ValueError(f"LR steps at epochs {list(step_epochs)} of {epochs} give milestones {milestones} "
                         f"outside (0, max_iter={max_iter}) or not increasing")
    return WarmupParamScheduler(
        MultiStepParamScheduler(
            values=[gamma**i for i in range(len(milestones) + 1)], milestones=milestones, num_updates=max_iter
        ),
        warmup_factor=warmup_factor,
        warmup_length=_check_warmup(int(warmup_iters), max_iter),
        warmup_method="linear",
    )


def poly_lr_multiplier(
    *, max_iter: int, warmup_iters: int, power: float = 1.0, warmup_factor: float = 1e-6
) -> WarmupParamScheduler:
    """mmseg's ``policy='poly'`` (to 0, per iteration) after a linear warm-up of ``warmup_iters``."""
    return WarmupParamScheduler(
        PolynomialDecayParamScheduler(base_value=1.0, power=float(power)),
        warmup_factor=warmup_factor,
        warmup_length=_check_warmup(int(warmup_iters), int(max_iter)),
        warmup_method="linear",
    )
