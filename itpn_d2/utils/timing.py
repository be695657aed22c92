"""Wall-clock timing of one callable that runs a whole step (forward, backward, optimizer step,
or an inference call), for ``tools/benchmark.py`` and ``tools/gpu_check.py``.

:func:`time_reps` / :func:`summarize`: warm-up, timed repetitions, median and spread
(quartiles, min, max). :func:`time_interleaved` alternates several steps rep by rep so that a
load change on a shared machine hits every side alike. On a GPU every timed call ends with a
device synchronisation.
"""
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["sync", "time_reps", "time_interleaved", "summarize", "format_summary"]


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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
