"""Trainers for what detectron2's do not cover.

* ``AutocastTrainer``: detectron2's ``AMPTrainer`` asserts CUDA and uses fp16 with a
  grad scaler. On CPU (this project's first-class device) bf16 autocast needs no
  scaler and is the cheapest speed-up on CPUs with AVX-512 bf16.
* Every trainer built by :func:`build_trainer` checks the loss terms right after the
  forward pass, before backward and the optimizer step: a NaN / inf term stops the
  run with :class:`NonFiniteLossError` naming the iteration and the term, on every
  rank at once (the ranks agree through one tiny all-reduce, so none is left waiting
  in DDP's gradient all-reduce), and before any weight changes. Since detectron2's
  ``PeriodicCheckpointer`` saves only after a completed step, no checkpoint is written
  after the failure: the last complete one is the last good state. (detectron2's own
  check in ``_write_metrics`` runs after backward, on the main process only, and
  names the whole loss dict.)
"""
import logging
import math
from typing import Dict

import torch
import torch.distributed as dist
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm

__all__ = [
    "NonFiniteLossError",
    "check_finite_losses",
    "non_finite_terms",
    "FiniteCheckTrainer",
    "FiniteCheckAMPTrainer",
    "AutocastTrainer",
    "build_trainer",
]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the term and the iteration."""


def non_finite_terms(loss_dict) -> Dict[str, float]:
    """{name: value} of the loss terms that are NaN or inf."""
    bad = {}
    for name, value in loss_dict.items():
        v = float(value.detach()) if torch.is_tensor(value) else float(value)
        if not math.isfinite(v):
            bad[name] = v
    return bad


def _message(bad: Dict[str, float], iteration: int, other_rank: bool = False) -> str:
    if other_rank:
        what = "a loss term became NaN or inf on another process"
    else:
        what = ", ".join(f"loss term '{n}' is {v}" for n, v in bad.items())
    return (
        f"{what} at iteration {iteration}; stopping before backward and the optimizer step. "
        "No checkpoint is written after this point: the last complete checkpoint in the output "
        "directory is untouched (resume from it with --resume, e.g. with a lower learning rate)."
    )


def check_finite_losses(loss_dict, iteration: int, *, all_ranks: bool = False) -> None:
    """Raise :class:`NonFiniteLossError` naming the non-finite loss terms.

    Args:
        all_ranks: in a multi-process run, agree across processes (a collective: every
            rank must call it), so that all of them stop at the same iteration.
    """
    bad = non_finite_terms(loss_dict)
    if all_ranks and comm.get_world_size() > 1:
        flag = torch.tensor([1.0 if bad else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if float(flag) > 0 and not bad:
            raise NonFiniteLossError(_message(bad, iteration, other_rank=True))
    if bad:
        raise NonFiniteLossError(_message(bad, iteration))


class _CheckedModel:
    """Stands in for ``trainer.model`` during one ``run_step``: calls the model, then checks
    its losses. A plain callable, not an ``nn.Module``: nothing else sees it (hooks run
    outside ``run_step``), and the checkpointer keeps the real model."""

    def __init__(self, model, trainer):
        self.model, self.trainer = model, trainer

    @property
    def training(self):
        return self.model.training

    def __getattr__(self, name):  # e.g. a hook's after_backward reading trainer.model.parameters()
        return getattr(self.model, name)

    def __call__(self, data):
        out = self.model(data)
        loss_dict = out if isinstance(out, dict) else {"total_loss": out}
        check_finite_losses(loss_dict, self.trainer.iter, all_ranks=True)
        return out


class _FiniteCheckMixin:
    def run_step(self):
        model = self.model
        self.model = _CheckedModel(model, self)
        try:
            super().run_step()
        finally:
            self.model = model


class FiniteCheckTrainer(_FiniteCheckMixin, SimpleTrainer):
    """``SimpleTrainer`` that stops on a non-finite loss term before backward (module docstring)."""


class FiniteCheckAMPTrainer(_FiniteCheckMixin, AMPTrainer):
    """``AMPTrainer`` (CUDA fp16) that stops on a non-finite loss term before backward."""


class AutocastTrainer(FiniteCheckTrainer):
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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX-512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def build_trainer(cfg, model, train_loader, optim):
    """The trainer for ``cfg.train``: fp16 AMP on CUDA, bf16 (or ``train.amp.dtype``)
    autocast elsewhere, else plain fp32; all with the non-finite loss check."""
    amp = cfg.train.get("amp", {}) or {}
    device = torch.device(cfg.train.device)
    if amp.get("enabled", False):
        if device.type == "cuda":
            return FiniteCheckAMPTrainer(model, train_loader, optim)
        dtype = getattr(torch, amp.get("dtype", "bfloat16"))
        if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
            logging.getLogger(__name__).warning(
                "train.amp.enabled=True on a CPU without native bf16 (no AVX-512-BF16 / AMX): bf16 "
                "matmuls and convolutions are emulated and much SLOWER than fp32 here. Consider "
                "train.amp.enabled=False."
            )
        return AutocastTrainer(model, train_loader, optim, device_type=device.type, dtype=dtype)
    return FiniteCheckTrainer(model, train_loader, optim)
