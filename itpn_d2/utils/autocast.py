"""Autocast only where it pays: keep detectron2's heads in fp32 under bf16 autocast.

On CPU, bf16 autocast turns the detection heads' convolutions (RPN, the 4-conv box and
mask heads), their deconvolution and RoIAlign into bf16 kernels that, on CPUs without
native bf16, are far slower than their fp32 versions (measured: see
``tools/benchmark.py --what det``). The heads are a small share of the FLOPs, so running
them in fp32 costs little and gives the time back; the backbone (the bulk of the FLOPs,
plain matmuls) stays under autocast.

``set_head_autocast(model, enabled=False)`` patches the *instance* ``forward`` of the
model's head modules (``proposal_generator``, ``roi_heads``, ``sem_seg_head``): inside
them autocast is off and floating-point tensor inputs are cast to fp32. Module
structure and state-dict keys do not change. ``enabled=True`` restores them.
"""
import functools
from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["set_head_autocast", "HEAD_MODULES"]

HEAD_MODULES = ("proposal_generator", "roi_heads", "sem_seg_head")


def _to_fp32(obj):
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, dict):
        return {k: _to_fp32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_fp32(v) for v in obj)
    return obj


def _fp32_forward(module: nn.Module, orig):
    @functools.wraps(orig)
    def forward(*args, **kwargs):
        if not torch.is_autocast_enabled(_device_type(module)):
            return orig(*args, **kwargs)
        with torch.autocast(device_type=_device_type(module), enabled=False):
            return orig(*_to_fp32(args), **_to_fp32(kwargs))

    return forward


def _device_type(module: nn.Module) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


def set_head_autocast(model: nn.Module, enabled: bool, names: Iterable[str] = HEAD_MODULES) -> nn.Module:
    """Run ``model.<name>`` for each of ``names`` in fp32 (``enabled=False``) or under the
    caller's autocast (``enabled=True``, the default behaviour). Returns ``model``."""
    model = getattr(model, "module", model)  # DDP
    for name in names:
        m = getattr(model, name, None)
        if m is None:
            continue
        patched = "forward" in m.__dict__
        if enabled and patched:
            del m.forward
        elif not enabled and not patched:
            m.forward = _fp32_forward(m, type(m).forward.__get__(m))
    return model
