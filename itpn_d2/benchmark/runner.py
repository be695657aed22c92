"""One benchmark run (``tools/benchmark.py``): the machine line, then each part of ``what``."""
import dataclasses

import torch

from .detection import bench_det
from .finetuning import bench_finetune
from .options import BenchmarkOptionError, BenchmarkOptions
from .pretraining import bench_pretrain
from .report import machine_line
from .training_loop import bench_loop

__all__ = ["PARTS", "run_benchmark"]

PARTS = ("pretrain", "loop", "det", "finetune")


def run_benchmark(options: BenchmarkOptions) -> None:
    """Print the figures of every part in ``options.what`` (comma list of :data:`PARTS`).

    Device defaults: ``device`` CUDA when available; pre-training ``batch`` 512 on a GPU (the
    release's per-GPU batch of its 8xb512 recipe), 4 on a CPU; warm-up and repetitions 3 + 10
    (pre-training, loop), 1 + 3 (detection) and 3 + 20 (fine-tuning); 1 + 3, 1 + 1 and 3 + 5 with ``quick``.
    Raises :class:`BenchmarkOptionError` for an unknown part or dtype.
    """
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(machine_line(device))
    if options.batch is None:
        options = dataclasses.replace(options, batch=512 if device.type == "cuda" else 4)
    what = [w.strip() for w in options.what.split(",") if w.strip()]
    unknown = set(what) - set(PARTS)
    if unknown:
        raise BenchmarkOptionError(f"--what: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    pw, pr = (1, 3) if options.quick else (3, 10)
    dw, dr = (1, 1) if options.quick else (1, 3)
    warmup = options.warmup
    if "pretrain" in what:
        bench_pretrain(options, device, warmup if warmup is not None else pw, options.reps or pr)
    if "loop" in what:
        bench_loop(options, device, warmup if warmup is not None else pw, options.reps or pr)
    if "det" in what:
        bench_det(options, device, warmup if warmup is not None else dw, options.reps or dr)
    if "finetune" in what:
        bench_finetune(options, device, warmup if warmup is not None else 3, options.reps or (5 if options.quick else 20))
