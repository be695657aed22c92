"""The training loop: detectron2's ``SimpleTrainer`` with mixed precision on any device,
gradient accumulation and a non-finite-loss check that costs one device sync per step.

:class:`ITPNTrainer` (built by :func:`build_trainer` from ``cfg.train``):

* **Precision** (``train.amp``): off = fp32 (on CUDA with TF32 matmuls and convolutions,
  ``train.tf32``, default on); on = the forward pass under ``torch.autocast(device, dtype)``
  with ``train.amp.dtype`` (default ``bfloat16`` on CPU, ``float16`` on CUDA, as detectron2's
  ``AMPTrainer``). fp16 scales the loss with a ``torch.amp.GradScaler``; bf16 has fp32's
  exponent range and needs none. (detectron2's ``AMPTrainer`` asserts CUDA and always
  builds a scaler.)
* **Gradient accumulation** (``train.grad_accum_steps = k``): one iteration reads ``k``
  batches of ``dataloader.train.total_batch_size`` images, back-propagates ``loss / k`` of
  each (DDP all-reduces only after the last one: ``no_sync``), then steps the optimizer once.
  Every loss here is a mean over its batch, so this is the gradient of one batch of
  ``k x total_batch_size`` images: the same math as the larger batch (tests).
* **Non-finite losses**: right after each forward pass, before backward and the optimizer
  step, the loss terms are stacked into one tensor and checked on the device; with several
  processes the "bad" flag is all-reduced on the device too, so every rank stops at the same
  iteration (none is left waiting in DDP's gradient all-reduce). The stacked values and the
  flag then come to the host in ONE transfer: the only device sync of a step (fp16 adds the
  GradScaler's own inf check in ``scaler.step``). The same host values are the logged losses:
  they are gathered over processes every ``train.log_period`` iterations
  (``gather_metric_period``), not every step. A bad term raises :class:`NonFiniteLossError`
  naming the iteration and the term. Since detectron2's ``PeriodicCheckpointer`` saves only
  after a completed step, no checkpoint is written after the failure: the last complete one
  is the last good state.
* **Resume across precisions**: a checkpoint written without a GradScaler (fp32, bf16, any
  CPU run) resumes under fp16 AMP with a fresh scaler (a warning says so), and a checkpoint
  with scaler state resumes without AMP (the state is ignored). detectron2's ``AMPTrainer``
  raises ``KeyError: 'grad_scaler'`` on the first.
"""
import contextlib
import logging
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from itpn_d2.utils.precision import cpu_has_native_bf16

__all__ = [
    "NonFiniteLossError",
    "TrainConfigError",
    "amp_dtype_of",
    "set_tf32",
    "check_finite_losses",
    "non_finite_terms",
    "ITPNTrainer",
    "FiniteCheckTrainer",
    "FiniteCheckAMPTrainer",
    "AutocastTrainer",
    "amp_settings",
    "build_trainer",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the term and the iteration."""


class TrainConfigError(ValueError):
    """A ``train.*`` key the trainer reads has a bad value; the message names the key."""


def non_finite_terms(loss_dict) -> Dict[str, float]:
    """{name: value} of the loss terms that are NaN or inf (one host read per term: for
    checks outside the training loop; :class:`ITPNTrainer` checks on the device)."""
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


def _flag_device(t: torch.Tensor) -> torch.Tensor:
    # NCCL reduces CUDA tensors only; gloo reduces CPU ones
    if dist.get_backend() == "nccl":
        return t if t.is_cuda else t.cuda()
    return t.cpu()


def check_finite_losses(loss_dict, iteration: int, *, all_ranks: bool = False) -> None:
    """Raise :class:`NonFiniteLossError` naming the non-finite loss terms.

    Args:
        all_ranks: in a multi-process run, agree across processes (a collective: every
            rank must call it), so that all of them stop at the same iteration.
    """
    names = list(loss_dict)
    values = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in loss_dict.values()])
    host = _finite_check_to_host(values, all_ranks=all_ranks)
    _raise_if_bad(names, host, iteration)


def _finite_check_to_host(values: torch.Tensor, *, all_ranks: bool) -> List[float]:
    """``values`` (T,) float -> [v_1..v_T, flag] on the host in one transfer; flag > 0 when any
    process has a non-finite value (all-reduced on the device when ``all_ranks``)."""
    flag = (~torch.isfinite(values)).any().to(values.dtype).reshape(1)
    if all_ranks and comm.get_world_size() > 1:
        flag = _flag_device(flag)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        flag = flag.to(values.device)
    return torch.cat([values, flag]).tolist()  # the one device -> host sync


def _raise_if_bad(names: Sequence[str], host: Sequence[float], iteration: int) -> None:
    if host[-1] <= 0:
        return
    bad = {n: v for n, v in zip(names, host[:-1]) if not math.isfinite(v)}
    raise NonFiniteLossError(_message(bad, iteration, other_rank=not bad))


class ITPNTrainer(SimpleTrainer):
    """``SimpleTrainer`` with autocast on any device, an optional GradScaler, gradient
    accumulation and the one-sync finite check (module docstring)."""

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        device_type: str = "cpu",
        amp_dtype: Optional[torch.dtype] = None,
        grad_scaler=None,
        grad_accum_steps: int = 1,
        gather_metric_period: int = 1,
    ):
        """
        Args:
            model, data_loader, optimizer: as ``SimpleTrainer``'s.
            device_type: "cuda" or "cpu", for ``torch.autocast``.
            amp_dtype: None (fp32) or the autocast dtype (torch.bfloat16 / torch.float16).
            grad_scaler: a ``torch.amp.GradScaler`` (fp16) or None.
            grad_accum_steps: batches per optimizer step (>= 1).
            gather_metric_period: losses are gathered over processes and logged every this
                many iterations (``train.log_period``).
        """
        super().__init__(model, data_loader, optimizer, gather_metric_period=gather_metric_period)
        if int(grad_accum_steps) < 1:
            raise ValueError(f"train.grad_accum_steps must be a positive integer, got {grad_accum_steps}")
        self.device_type = device_type
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler
        self.grad_accum_steps = int(grad_accum_steps)
        # models that log their own host-read metrics (MaskedPretrainer's mfm_posonly_* meter)
        # do it at the same period as the losses
        inner = getattr(model, "module", model)
        if hasattr(inner, "metrics_period"):
            inner.metrics_period = int(gather_metric_period)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    def _forward_backward(self, data, last: bool) -> Tuple[List[str], List[float]]:
        no_sync = getattr(self.model, "no_sync", None)
        ctx = no_sync() if (not last and no_sync is not None) else contextlib.nullcontext()
        with ctx:
            with self._autocast():
                loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            names = list(loss_dict)
            values = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
            host = _finite_check_to_host(values, all_ranks=True)
            _raise_if_bad(names, host, self.iter)
            losses = sum(loss_dict.values())
            if self.grad_accum_steps > 1:
                losses = losses / self.grad_accum_steps
            if self.grad_scaler is not None:
                self.grad_scaler.scale(losses).backward()
            else:
                losses.backward()
        return names, host[:-1]

    def run_step(self):
        assert self.model.training, "[ITPNTrainer] model was changed to eval mode!"
        self.optimizer.zero_grad(set_to_none=True)
        k = self.grad_accum_steps
        data_time, total, names = 0.0, None, None
        for micro in range(k):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            names, host = self._forward_backward(data, last=micro == k - 1)
            total = np.asarray(host, dtype=np.float64) if total is None else total + np.asarray(host)
        self.after_backward()
        self._write_metrics(dict(zip(names, (total / k).tolist())), data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _write_metrics(self, loss_dict: Dict[str, float], data_time: float, prefix: str = "", iter=None):
        iter = self.iter if iter is None else iter
        last = iter == getattr(self, "max_iter", 0) - 1  # the final losses are logged whatever the period
        if (iter + 1) % self.gather_metric_period == 0 or last:
            # host floats already (the finite check brought them over): no device access here
            SimpleTrainer.write_metrics(
                {k: torch.tensor(v) for k, v in loss_dict.items()}, data_time, iter, prefix
            )
            if self.grad_scaler is not None and comm.is_main_process():
                get_event_storage().put_scalar("grad_scale", self.grad_scaler.get_scale(), cur_iter=iter)

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        has = "grad_scaler" in state_dict
        if self.grad_scaler is not None and has:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        elif self.grad_scaler is not None:
            logger.warning(
                "The checkpoint has no GradScaler state (it was written without fp16 AMP): the loss "
                f"scale starts afresh at {self.grad_scaler.get_scale():g} and adapts within a few iterations."
            )
        elif has:
            logger.info("The checkpoint's GradScaler state is not used (this run has no fp16 AMP)")


class FiniteCheckTrainer(ITPNTrainer):
    """fp32 :class:`ITPNTrainer` (kept under its former name)."""


class AutocastTrainer(ITPNTrainer):
    """:class:`ITPNTrainer` whose forward runs under ``torch.autocast(device_type, dtype)``,
    without a GradScaler (bf16)."""

    def __init__(self, model, data_loader, optimizer, *, device_type: str = "cpu", dtype=torch.bfloat16, **kwargs):
        super().__init__(model, data_loader, optimizer, device_type=device_type, amp_dtype=dtype, **kwargs)


class FiniteCheckAMPTrainer(ITPNTrainer):
    """fp16 autocast + GradScaler on CUDA (detectron2's ``AMPTrainer`` behaviour)."""

    def __init__(self, model, data_loader, optimizer, **kwargs):
        kwargs.setdefault("grad_scaler", torch.amp.GradScaler("cuda"))
        super().__init__(model, data_loader, optimizer, device_type="cuda", amp_dtype=torch.float16, **kwargs)


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16}


def amp_settings(cfg) -> Tuple[str, Optional[torch.dtype], bool]:
    """(device type, autocast dtype or None for fp32, whether a GradScaler is needed) for
    ``cfg.train``: ``train.amp.dtype`` is honoured on every device (default: float16 on CUDA,
    as detectron2's AMPTrainer; bfloat16 elsewhere); only float16 uses a GradScaler."""
    amp = cfg.train.get("amp", {}) or {}
    device_type = torch.device(cfg.train.get("device", "cuda")).type
    if not amp.get("enabled", False):
        return device_type, None, False
    name = amp.get("dtype", None) or ("float16" if device_type == "cuda" else "bfloat16")
    if str(name) not in _AMP_DTYPES:
        raise TrainConfigError(f"train.amp.dtype must be one of {sorted(_AMP_DTYPES)}, got {name!r}")
    dtype = _AMP_DTYPES[str(name)]
    return device_type, dtype, dtype == torch.float16


def amp_dtype_of(cfg) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg.train`` (None: fp32)."""
    return amp_settings(cfg)[1]


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions (Ampere and newer): ~10 bits
    of mantissa in the products, fp32 accumulation; what fp32 training on these cards uses."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def build_trainer(cfg, model, train_loader, optim):
    """The trainer for ``cfg.train`` (module docstring): ``train.amp`` (``enabled``, ``dtype``),
    ``train.grad_accum_steps`` (default 1), ``train.log_period``, ``train.tf32`` (CUDA fp32,
    default True)."""
    device_type, dtype, needs_scaler = amp_settings(cfg)
    if device_type == "cuda" and dtype is None:
        set_tf32(cfg.train.get("tf32", True))
    if device_type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        logger.warning(
            "train.amp.enabled=True on a CPU without native bf16 (no AVX-512-BF16 / AMX): bf16 "
            "matmuls and convolutions are emulated and much SLOWER than fp32 here. Consider "
            "train.amp.enabled=False."
        )
    k = cfg.train.get("grad_accum_steps", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise TrainConfigError(f"train.grad_accum_steps must be a positive integer, got {k!r}")
    scaler = torch.amp.GradScaler(device_type) if needs_scaler else None
    logger.info(
        f"Trainer: {'fp32' if dtype is None else str(dtype).replace('torch.', '') + ' autocast'} on {device_type}"
        f"{', GradScaler' if scaler else ''}; {k} batch(es) per optimizer step"
    )
    return ITPNTrainer(
        model, train_loader, optim, device_type=device_type, amp_dtype=dtype, grad_scaler=scaler,
        grad_accum_steps=k, gather_metric_period=max(1, int(cfg.train.get("log_period", 20) or 1)),
    )
