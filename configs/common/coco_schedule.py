"""Step learning-rate schedules with linear warm-up, as in the iTPN detection recipe.

The reference (mmdet) trains 12 epochs with steps after epochs 9 and 11 for 1x, and
500 warm-up iterations from 0.001x. At 16 images per batch detectron2 counts 1x as
90k iterations (~12 COCO epochs), so the steps land at 9/12 and 11/12 of training;
3x is 270k iterations with steps at 27/36 and 33/36 (mmdet's 36-epoch 3x schedule).
"""
from typing import Sequence

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def step_schedule(max_iter: int, milestones: Sequence[int], warmup_iters: int = 500, warmup_factor: float = 0.001):
    """LR multiplier: linear warm-up over ``warmup_iters``, then x0.1 at each milestone."""
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


def epochs_schedule(max_iter: int, step_fractions: Sequence[float], warmup_iters: int = 500):
    """``step_schedule`` with milestones given as fractions of ``max_iter``."""
    return step_schedule(max_iter, [int(round(f * max_iter)) for f in step_fractions], warmup_iters)


lr_multiplier_1x = epochs_schedule(90000, (9 / 12, 11 / 12))  # milestones 67500, 82500
lr_multiplier_3x = epochs_schedule(270000, (27 / 36, 33 / 36))  # milestones 202500, 247500
