"""Trainers for devices detectron2's AMPTrainer does not cover.

detectron2's ``AMPTrainer`` asserts CUDA and uses fp16 with a grad scaler. On CPU
(this project's first-class device) bf16 autocast needs no scaler and is the
cheapest speed-up on CPUs with AVX-512 bf16.
"""
import math

import torch
from detectron2.engine import SimpleTrainer


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the term and the iteration."""


class AutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward runs under ``torch.autocast(device_type, dtype)``.

    Backward and the optimizer step run in the parameters' dtype (fp32).
    """

    def __init__(self, model, data_loader, optimizer, *, device_type: str = "cpu", dtype=torch.bfloat16, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.device_type = device_type
        self.dtype = dtype

    def run_step(self):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            super().run_step()


def check_finite_losses(loss_dict, iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first non-finite loss term."""
    for name, value in loss_dict.items():
        v = float(value.detach()) if torch.is_tensor(value) else float(value)
        if not math.isfinite(v):
            raise NonFiniteLossError(
                f"loss term '{name}' is {v} at iteration {iteration}; stopping. "
                "The last complete checkpoint in the output directory is untouched."
            )
