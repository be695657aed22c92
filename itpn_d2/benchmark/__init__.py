"""Speed and memory of iTPN pre-training and detection (``tools/benchmark.py``).

* :mod:`.options`: :class:`BenchmarkOptions` (one field per flag), the dtypes and configs a run uses.
* :mod:`.runner`: :func:`run_benchmark`, the machine line and each part of ``what``.
* :mod:`.train_step`: the pre-training step both sides time, its inputs, optimizers and model FLOPs.
* :mod:`.reference`: mmpretrain's iTPN step, the reference side (optional extra ``bench``).
* :mod:`.pretraining`: ``--what pretrain`` (ours beside the reference, interleaved).
* :mod:`.training_loop`: ``--what loop`` (the training script's loader, trainer and optimizer).
* :mod:`.detection`: ``--what det`` and :func:`set_head_autocast` (detection heads in fp32).
* :mod:`.finetuning`: ``--what finetune`` (the demo's fine-tuning steps on their own data, profiled).
* :mod:`.report`: the machine line and memory figures.

Timing, memory, FLOP counting and autocast are :mod:`itpn_d2.utils` (``timing``, ``memory``,
``flops``, ``precision``), shared with ``tools/gpu_check.py``.
"""
from .detection import HEAD_MODULES, set_head_autocast
from .options import DTYPES, BenchmarkOptionError, BenchmarkOptions
from .runner import PARTS, run_benchmark
from .train_step import loader_inputs, model_flops

__all__ = [
    "BenchmarkOptions",
    "BenchmarkOptionError",
    "DTYPES",
    "PARTS",
    "run_benchmark",
    "HEAD_MODULES",
    "set_head_autocast",
    "loader_inputs",
    "model_flops",
]
