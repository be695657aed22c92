"""Experiments built from whole training runs (each run a ``tools/lazyconfig_train_net.py``
subprocess), with their bookkeeping and reports.

* :mod:`.integral_ablation`: what the pyramid in pre-training and MFM each add
  (``tools/ablate_integral.py``): :class:`AblationOptions`, :func:`run_ablation`, the runs and
  the FLOP budgets.
* :mod:`.ablation_variants`: the pre-training kinds, fine-tuning variants, claims, budgets and tasks.
* :mod:`.ablation_report`: the per-variant table, paired claims, ``results.md`` and plots.
"""
from .ablation_variants import BUDGETS, CLAIMS, PRETRAININGS, VARIANTS, Task, make_tasks
from .integral_ablation import AblationError, AblationOptions, run_ablation

__all__ = [
    "AblationError",
    "AblationOptions",
    "run_ablation",
    "BUDGETS",
    "CLAIMS",
    "PRETRAININGS",
    "VARIANTS",
    "Task",
    "make_tasks",
]
