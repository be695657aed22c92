"""fvcore FLOP counting for iTPN models.

fvcore counts one fused multiply-add as one FLOP and has no handle for
``aten::scaled_dot_product_attention``; without one the attention matmuls
(QK^T and AV) would be silently skipped.
"""
from typing import Any, List

import numpy as np
import torch
from fvcore.nn import FlopCountAnalysis

__all__ = ["sdpa_flop_jit", "flop_count_analysis"]


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """MACs of softmax(QK^T)V: (..., L, d) x (..., S, d) and (..., L, S) x (..., S, dv)."""
    q, k, v = (inputs[i].type().sizes() for i in range(3))
    batch = int(np.prod(q[:-2]))
    L, d, S, dv = q[-2], q[-1], k[-2], v[-1]
    return batch * L * S * (d + dv)


def flop_count_analysis(model: torch.nn.Module, inputs) -> FlopCountAnalysis:
    """``FlopCountAnalysis`` with the attention handle, quiet about ops that cost nothing."""
    fca = FlopCountAnalysis(model, inputs).set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca
