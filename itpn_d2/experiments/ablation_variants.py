"""What the integral ablation (``tools/ablate_integral.py``) compares.

* :data:`PRETRAININGS`: the pre-training kinds (config and overrides): MIM without the
  pyramid, MIM with it, MIM + MFM with it.
* :data:`VARIANTS`: each fine-tuning variant's pre-training kind and ``train.backbone_load``.
* :data:`CLAIMS`: the pairs of variants whose per-seed differences are reported.
* :data:`BUDGETS`: equal pre-training iterations or equal pre-training FLOPs.
* :class:`Task` / :func:`make_tasks`: the fine-tuning tasks (detection, segmentation) and the
  metrics.json keys each reports.

Config paths are relative to the checkout (:data:`itpn_d2.utils.checkout.REPO_ROOT`), where the runs start.
"""
import os
from typing import Dict, Optional, Sequence

from itpn_d2.utils.checkout import REPO_ROOT

__all__ = [
    "PRETRAIN_CFG",
    "BACKBONE_ONLY_CFG",
    "FINETUNE_CFG",
    "SEG_FINETUNE_CFG",
    "PRETRAININGS",
    "VARIANTS",
    "CLAIMS",
    "BUDGETS",
    "Task",
    "make_tasks",
    "budget_of",
]


PRETRAIN_CFG = "configs/pretrain/mim_mfm_itpn_tiny_cpu.py"
BACKBONE_ONLY_CFG = "configs/pretrain/mim_backbone_only_itpn_tiny_cpu.py"
# The demo's detection recipe as the committed 5-seed runs saved it (the demo has moved on since: that
# file says how); docs/ablation/recipes/ holds the recipes those runs saved.
FINETUNE_CFG = "configs/COCO/mask_rcnn_itpn_tiny_ablation.py"
SEG_FINETUNE_CFG = "configs/ADE20K/uper_itpn_tiny_demo.py"

# pre-training kind: (config, overrides)
PRETRAININGS = {
    "backbone_only": (BACKBONE_ONLY_CFG, []),
    "mim": (PRETRAIN_CFG, ["model.mfm_decoder=null", "model.teacher=null"]),  # hydra syntax for None
    "mim_mfm": (PRETRAIN_CFG, []),
}
VARIANTS = {
    # name: (pre-training kind, train.backbone_load)
    "scratch": (None, "strict"),
    "backbone_only": ("backbone_only", "encoder_only"),
    "encoder_only": ("mim", "encoder_only"),
    "integral_mim": ("mim", "strict"),
    "integral_mim_mfm": ("mim_mfm", "strict"),
}
# claim: (label, variant a, variant b); reported as a - b
CLAIMS = [
    ("pyramid pre-trained vs backbone-only (the paper's baseline)", "integral_mim", "backbone_only"),
    ("pyramid pre-trained vs re-initialised", "integral_mim", "encoder_only"),
    ("MFM vs not", "integral_mim_mfm", "integral_mim"),
    ("integral (MIM + MFM) vs backbone-only", "integral_mim_mfm", "backbone_only"),
    ("backbone-only pre-training vs scratch", "backbone_only", "scratch"),
]
BUDGETS = ("iters", "flops")


def budget_of(variant: str, budget: str, iterations: Optional[Dict[str, Dict[str, int]]] = None) -> str:
    """The budget whose runs stand for ``variant`` under ``budget``. Scratch pre-trains nothing, and
    the pre-training that sets the FLOPs budget (the most expensive per iteration) has the same
    length under both budgets: either way the equal-iterations fine-tunings are the very runs the
    other budget would make (same recipe, checkpoint and seed), so they serve both.

    Args:
        iterations: ``{budget: {pre-training kind: iterations}}``; without it only scratch is shared.
    """
    kind = VARIANTS[variant][0]
    if kind is None:
        return "iters"
    if iterations is not None and iterations[budget][kind] == iterations["iters"][kind]:
        return "iters"
    return budget


class Task:
    """A fine-tuning task: its config and the metrics.json keys it reports.

    ``metrics`` maps a short name to a metrics.json key; a missing or NaN value (e.g. COCO
    AP of a detector with no detection yet) counts as 0, as COCO's evaluation would score it.
    """

    def __init__(self, name: str, config: str, metrics: Dict[str, str], extra: Sequence[str] = ()):
        """
        Args:
            name: "det" or "seg", the prefix of the run folders.
            config: the fine-tuning LazyConfig, absolute or relative to the checkout.
            metrics: short metric name -> metrics.json key.
            extra: overrides added to every fine-tuning command of the task.
        """
        self.name, self.config, self.metrics, self.extra = name, config, dict(metrics), list(extra)

    def max_iter(self) -> int:
        """The config's own ``train.max_iter`` (its schedule when the experiment sets none)."""
        from detectron2.config import LazyConfig

        path = self.config if os.path.isabs(self.config) else os.path.join(REPO_ROOT, self.config)
        return int(LazyConfig.load(path).train.max_iter)

    def check(self, flag: str) -> None:
        """Raise ``FileNotFoundError`` naming ``flag`` (the option that sets the config) if the
        config is missing."""
        path = self.config if os.path.isabs(self.config) else os.path.join(REPO_ROOT, self.config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"task {self.name!r}: config {self.config} not found (set {flag})")


def make_tasks(names: Sequence[str], det_config: str = FINETUNE_CFG, seg_config: Optional[str] = SEG_FINETUNE_CFG,
               seg_metric: str = "sem_seg/mIoU") -> Dict[str, Task]:
    """The tasks ``names`` (of "det", "seg"), their configs checked. Raises ``ValueError`` for an
    unknown task or "seg" without ``seg_config``, ``FileNotFoundError`` for a missing config."""
    tasks = {}
    for n in names:
        if n == "det":
            tasks[n] = Task("det", det_config, {"box_AP": "bbox/AP", "mask_AP": "segm/AP"})
            tasks[n].check("--det-config")
        elif n == "seg":
            if not seg_config:
                raise ValueError("task 'seg' needs --seg-config (a segmentation config that logs "
                                 f"{seg_metric!r} to metrics.json)")
            tasks[n] = Task("seg", seg_config, {"mIoU": seg_metric})
            tasks[n].check("--seg-config")
        else:
            raise ValueError(f"unknown task {n!r}; choose from det, seg")
    return tasks
