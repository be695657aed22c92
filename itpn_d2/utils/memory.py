"""Peak memory of one call (a training or inference step), for ``tools/benchmark.py`` and
``tools/gpu_check.py``.

* :func:`peak_memory`: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's
  resident-set high-water mark during the call (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` before the call), with the resident set before the call for reference.
* :func:`peak_allocated`: the quantity ``max_memory_allocated`` reports on a GPU (bytes of live
  tensors at their peak), measured on any device from the profiler's allocation events; on CPU
  it says what a step would hold on a card, independent of the CPU allocator's caching.
* :func:`live_tensor_bytes`: what is allocated before a step (the baseline of ``peak_allocated``).
"""
from typing import Callable, Dict, Optional

import torch

from .timing import sync

__all__ = ["peak_memory", "peak_allocated", "live_tensor_bytes"]


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
