"""The iTPN detection schedule, per image: lr, epochs, LR steps and warm-up follow the batch.

The release (sunsmarterjie/iTPN ``det/README.md``: "We use 32 V100 GPUs";
``det/configs/_base_/datasets/coco_instance.py``: ``samples_per_gpu=2``) trains at
**64 images per batch**, AdamW at the lr of each config (2e-4 for pixel B 1x), mmdet's
epoch runner for 12 (1x) or 36 (3x) epochs with x0.1 steps at epochs 9 and 11 (1x;
``lr_config=dict(step=[9, 11])``) or 27 and 33 (3x), a linear warm-up of 500 iterations
from 0.001x (``det/configs/_base_/schedules/schedule_1x.py``), and evaluates and saves a
checkpoint every epoch (mmdet's default runtime).

:func:`set_coco_schedule` writes all of it as interpolations of
``dataloader.train.total_batch_size`` (``itpn_d2.schedule``), resolved after the
command-line overrides: lr = lr_at_64 * batch / 64, max_iter = epochs * (117266 // batch),
warm-up = 500 * 64 / batch iterations (the same 32,000 images), steps at the same epochs.
At the default batch 64 this is the release's run; at 16 (8 GPUs x 2) it is lr 5e-5,
87,948 iterations, 2,000 warm-up iterations, steps at 65,961 and 80,619.

An epoch is 117,266 images: COCO train2017 less the 1,021 images without annotations, which
both mmdet (``filter_empty_gt=True``) and detectron2 (``filter_empty=True``) leave out.
"""
from typing import Sequence

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from itpn_d2.schedule import iters_for_epochs, iters_for_images, lr_at_batch, step_lr_multiplier

COCO_TRAIN_IMAGES = 117266
RELEASE_BATCH = 64
RELEASE_WARMUP_ITERS = 500  # at RELEASE_BATCH


def set_coco_schedule(train, optimizer, *, lr: float, epochs: int, step_epochs: Sequence[int],
                      ref_batch: int = RELEASE_BATCH, images_per_epoch: int = COCO_TRAIN_IMAGES):
    """Fill ``optimizer.lr``, ``train.max_iter``, checkpoint / eval periods (one epoch) from the
    recipe; returns the LR multiplier (a LazyCall). ``lr`` is the recipe's lr at ``ref_batch``."""
    optimizer.lr = lr_at_batch(lr, ref_batch)
    train.max_iter = iters_for_epochs(epochs, images_per_epoch)
    train.checkpointer.period = iters_for_epochs(1, images_per_epoch)
    train.eval_period = iters_for_epochs(1, images_per_epoch)
    return L(step_lr_multiplier)(
        max_iter="${train.max_iter}",
        epochs=epochs,
        step_epochs=list(step_epochs),
        warmup_iters=iters_for_images(RELEASE_WARMUP_ITERS * ref_batch),
        warmup_factor=0.001,
    )


def step_schedule(max_iter: int, milestones: Sequence[int], warmup_iters: int = 500, warmup_factor: float = 0.001):
    """A fixed-iteration step schedule (for demo configs that pin ``train.max_iter``): linear
    warm-up over ``warmup_iters``, then x0.1 at each milestone."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1, 0.01],
            milestones=list(milestones),
            num_updates=max_iter,
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )
