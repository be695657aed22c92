"""Timing, FLOP and memory helpers for ``tools/benchmark.py``.

Everything here measures one callable that runs a whole step (forward, backward,
optimizer step, or an inference call):

* :func:`time_reps` / :func:`summarize`: warm-up, timed repetitions, median and
  spread (quartiles, min, max). ``time_interleaved`` alternates several steps
  rep by rep so that a load change on a shared machine hits every side alike.
* :func:`count_flops`: FLOPs of one call with ``torch.utils.flop_counter`` (2 per
  multiply-add). Its registry has no formula for the CPU flash-attention kernel
  that ``scaled_dot_product_attention`` dispatches to on CPU, so
  :func:`register_cpu_sdpa_flops` adds one (same formula as the CUDA kernels);
  without it attention FLOPs would be silently missing on CPU.
* :func:`matmul_rate`: GFLOP/s of a plain square matmul, the machine's practical
  peak for a dtype.
* :func:`datasheet_tflops`: a GPU's dense bf16/fp16 tensor-core peak from its
  datasheet, the denominator of model FLOPs utilisation (MFU) as usually quoted.
* :func:`peak_memory`: peak bytes during one call: ``torch.cuda.max_memory_allocated``
  on GPU; on CPU the process's resident-set high-water mark during the call (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs`` before the call), with the
  resident set before the call for reference.
* :func:`peak_allocated`: the quantity ``max_memory_allocated`` reports on a GPU
  (bytes of live tensors at their peak), measured on any device from the
  profiler's allocation events; on CPU it says what a step would hold on a card,
  independent of the CPU allocator's caching.
"""
import contextlib
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = [
    "time_reps",
    "time_interleaved",
    "summarize",
    "format_summary",
    "count_flops",
    "register_cpu_sdpa_flops",
    "matmul_rate",
    "datasheet_tflops",
    "peak_memory",
    "peak_allocated",
    "live_tensor_bytes",
    "autocast_ctx",
    "sync",
]


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast_ctx(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype`` (None or float32: a no-op context)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def time_reps(fn: Callable[[], object], *, warmup: int, reps: int, device="cpu") -> List[float]:
    """Seconds per call of ``fn`` for ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def time_interleaved(fns: Dict[str, Callable[[], object]], *, warmup: int, reps: int, device="cpu"):
    """Like :func:`time_reps` for several callables, alternating them rep by rep."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            out[k].append(time.perf_counter() - t0)
    return out


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """median, q1, q3 (quartiles; equal to min/max for < 4 samples), min, max, n."""
    t = sorted(times)
    if not t:
        raise ValueError("summarize: no timings")
    if len(t) >= 4:
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive")
    else:
        q1, q3 = t[0], t[-1]
    return {"median": statistics.median(t), "q1": q1, "q3": q3, "min": t[0], "max": t[-1], "n": len(t)}


def format_summary(s: Dict[str, float], unit: str = "s") -> str:
    return (
        f"median {s['median']:.4f} {unit} (IQR {s['q1']:.4f}-{s['q3']:.4f}, "
        f"min {s['min']:.4f}, max {s['max']:.4f}, n={s['n']})"
    )


_SDPA_REGISTERED = False


def register_cpu_sdpa_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernels (idempotent)."""
    global _SDPA_REGISTERED
    if _SDPA_REGISTERED:
        return
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

    _SDPA_REGISTERED = True


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of one call of ``fn``, forward and backward alike."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


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


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device="cpu") -> Dict[str, object]:
    """Peak memory of one call of ``fn``.

    Returns {"bytes": int or None, "how": str}. GPU: ``max_memory_allocated`` over the
    call (everything allocated, weights included). CPU: the process's resident-set
    high-water mark during the call (everything resident in the process, other models
    included), or the process-lifetime ``ru_maxrss`` where Linux's counters are missing.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return {"bytes": int(torch.cuda.max_memory_allocated()), "how": "torch.cuda.max_memory_allocated"}
    import gc

    gc.collect()
    before = _status_kb("VmRSS")
    if before is None or not _reset_hwm():
        import resource

        fn()
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"bytes": int(kb) * 1024, "how": "ru_maxrss (process high-water, not per step)"}
    fn()
    hwm = _status_kb("VmHWM")
    # Absolute: freed memory stays resident in the allocator, so a difference would read ~0
    # after warm-up steps; the RSS before the step (weights, optimizer state, other models
    # in the process) is reported beside it.
    return {"bytes": hwm * 1024, "how": f"process RSS high-water during the step; RSS before it {before / 1024:.0f} MiB"}


def live_tensor_bytes(*objs) -> int:
    """Bytes of the distinct tensor storages reachable from ``objs`` (tensors, modules,
    optimizers, and lists / tuples / dicts of them): what is allocated before a step."""
    seen = {}

    def visit(o):
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[(st.device, st.data_ptr())] = st.nbytes()
        elif isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                visit(t)
                if t.grad is not None:
                    visit(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            for state in o.state.values():
                visit(state)
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)
        elif hasattr(o, "get_fields"):  # detectron2 Instances
            visit(o.get_fields())
        elif hasattr(o, "tensor") and isinstance(o.tensor, torch.Tensor):  # Boxes, BitMasks
            visit(o.tensor)

    for o in objs:
        visit(o)
    return int(sum(seen.values()))


def peak_allocated(fn: Callable[[], object], device="cpu", *, baseline: int = 0) -> Dict[str, object]:
    """Peak bytes of live tensors during one call of ``fn``: ``baseline`` (what is live
    before the call, see :func:`live_tensor_bytes`) plus the highest running sum of the
    profiler's allocation and free events on ``device`` during the call.

    This is what ``torch.cuda.max_memory_allocated`` measures on a GPU, without the CUDA
    caching allocator's block rounding and without library workspaces (cuDNN, cuBLAS),
    so on CPU it estimates what the same step holds on a card in the same dtype.
    The free of a tensor allocated before the call has no event: the call must free
    nothing counted in ``baseline`` (zero gradients with ``set_to_none=True`` before
    measuring, and leave them out of the baseline).
    Returns {"bytes", "delta" (peak above the baseline), "how"}.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
        sync(device)
    want = torch._C._autograd.DeviceType.CUDA if device.type == "cuda" else torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == want]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()  # negative for a free
        peak = max(peak, cur)
    return {"bytes": int(baseline) + peak, "delta": peak,
            "how": f"live tensors: {baseline / 2**20:.0f} MiB before the step + {peak / 2**20:.0f} MiB peak "
                   f"allocated during it ({len(events)} profiler memory events)"}
