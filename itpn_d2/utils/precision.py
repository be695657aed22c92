"""Low-precision settings shared by training and the tools: the one probe for native bf16 /
fp16 CPU kernels, and the autocast context the benchmarks wrap a step in.

On a CPU without native bf16 (no AVX-512-BF16 / AMX) oneDNN emulates every bf16 matmul and
convolution at < 1 GFLOP/s (tens in fp32), so bf16 autocast there is a slowdown: the trainer
warns (``train.amp.enabled=True``) and the benchmark skips the dtype.
"""
import contextlib
from typing import Optional

import torch

__all__ = ["native_low_precision", "cpu_has_native_bf16", "autocast_ctx"]


def native_low_precision(device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` runs on native kernels on ``device``: always for fp32 and on GPUs; on a
    CPU, what oneDNN reports for bf16 / fp16. Where this torch cannot tell, assume native
    (nothing is skipped or warned about on a guess)."""
    if torch.device(device).type != "cpu" or dtype == torch.float32:
        return True
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return True


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX-512-BF16 or AMX)."""
    return native_low_precision("cpu", torch.bfloat16)


def autocast_ctx(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype`` (None or float32: a no-op context)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
