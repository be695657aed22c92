"""FLOP counting and FLOP rates, in one convention: **2 FLOPs per multiply-add**.

That is the convention of ``torch.utils.flop_counter`` (used here for every count) and of GPU
datasheets (a tensor core's fused multiply-add counts 2), so a step's FLOPs over its time over
the datasheet peak is model FLOPs utilisation (MFU) as usually quoted, and the matmul rate
below is comparable with both. fvcore's counters (``FlopCountAnalysis``) count one
multiply-add as ONE FLOP: their figures are half of these. Only matmuls, convolutions and
attention are counted (elementwise work, norms and softmax are not).

* :func:`count_flops`: FLOPs of one call of a function (forward and backward alike).
* :func:`forward_flops`: FLOPs of one forward pass of a module (no autograd graph).
* :func:`register_cpu_sdpa_flops`: the flop counter's registry has no formula for the CPU
  flash-attention kernel that ``scaled_dot_product_attention`` dispatches to on CPU; this adds
  one (the same formula as the CUDA kernels), without which attention would be silently missing
  on CPU. Both counters call it.
* :func:`matmul_rate`: GFLOP/s of a plain square matmul, the machine's practical peak for a dtype.
* :func:`datasheet_tflops`: a GPU's dense bf16/fp16 tensor-core peak from its datasheet, the
  denominator of MFU.
"""
from typing import Callable, Optional

import torch

from .timing import time_reps

__all__ = [
    "FLOP_CONVENTION",
    "count_flops",
    "forward_flops",
    "register_cpu_sdpa_flops",
    "matmul_rate",
    "datasheet_tflops",
]

FLOP_CONVENTION = "2 FLOPs per multiply-add (torch.utils.flop_counter)"


def register_cpu_sdpa_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernels (idempotent)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of one call of ``fn``, forward and backward alike."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def forward_flops(module: torch.nn.Module, *inputs) -> int:
    """FLOPs (2 per multiply-add) of ``module(*inputs)`` under ``torch.no_grad``."""
    with torch.no_grad():
        return count_flops(lambda: module(*inputs))


def matmul_rate(dtype: torch.dtype, *, n: int = 2048, device="cpu", reps: int = 5, warmup: int = 2) -> float:
    """Best GFLOP/s over ``reps`` ``n x n @ n x n`` matmuls in ``dtype`` (2 n^3 FLOPs): the
    practical peak, so the best rep (least disturbed by other load), not the median."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    t = time_reps(lambda: torch.mm(a, b), warmup=warmup, reps=reps, device=device)
    return 2.0 * n**3 / min(t) / 1e9


# Dense (no 2:4 sparsity) bf16 = fp16 tensor-core TFLOP/s from NVIDIA's datasheets. Keys are
# matched against torch.cuda.get_device_name() in this order, so the more specific name comes
# first ("H100 PCIe" and "H100 NVL" before the SXM part, whose name is e.g. "NVIDIA H100 80GB HBM3").
_DATASHEET_BF16_TFLOPS = (
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    ("A100", 312.0),
)


def datasheet_tflops(device_name: str, dtype: torch.dtype) -> Optional[float]:
    """Datasheet dense tensor-core peak (TFLOP/s) of the GPU called ``device_name`` for bf16 or
    fp16; None for other dtypes and cards not in the table (the caller then reports the fraction
    of the measured matmul rate only)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.upper()
    for key, tflops in _DATASHEET_BF16_TFLOPS:
        if key.upper() in name:
            return tflops
    return None
