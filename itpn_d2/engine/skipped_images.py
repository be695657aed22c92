"""The ``skipped_images`` metric of every training run, from the trainer side.

The mappers that skip unreadable files (``MIMDatasetMapper``, ``SafeDatasetMapper``; see
:mod:`itpn_d2.data.skipped_files`) run in DataLoader workers, so their counters live in
other processes; each hands its count over on its next good sample as the field
``"skipped_images"``. :class:`SkippedImagesMetric` reads that field from every batch the
trainer draws, sums it over the training processes and logs

* ``skipped_images``: files skipped since the previous report (all processes);
* ``skipped_images_total``: the running total since this process started.

One process reports every iteration; several processes report every ``period`` iterations
(``train.log_period``) and at the last one, summing with detectron2's CPU (gloo) collective
so that no GPU sync is added to the step.

Any model works (detection, segmentation, pre-training): nothing is asked of it.
"""
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from itpn_d2.engine.hooks import BatchCallbackLoader

__all__ = ["SkippedImagesMetric", "count_skipped"]


def count_skipped(batch) -> int:
    """Sum of the ``"skipped_images"`` fields of a batch (a list of dataset dicts)."""
    if not isinstance(batch, (list, tuple)):
        return 0
    return sum(int(d.get("skipped_images", 0)) for d in batch if isinstance(d, dict))


class SkippedImagesMetric(HookBase):
    """Logs ``skipped_images`` / ``skipped_images_total`` (module docstring). Register it on
    every process: the sum over processes is a collective."""

    def __init__(self, period: int = 1):
        self.period = max(1, int(period))
        self.pending = 0
        self.total = 0

    def before_train(self):
        # SimpleTrainer makes its iterator from ``data_loader`` at the first step, after this
        self.trainer.data_loader = BatchCallbackLoader(self.trainer.data_loader, self._count)

    def _count(self, batch):
        self.pending += count_skipped(batch)

    def after_step(self):
        if comm.get_world_size() > 1 and dist.is_initialized():
            next_iter = self.trainer.iter + 1
            if next_iter % self.period and next_iter != self.trainer.max_iter:
                return
            n, self.pending = self.pending, 0
            n = int(sum(comm.all_gather(n)))  # a gloo group under NCCL: host ints, no device sync
        else:
            n, self.pending = self.pending, 0
        self.total += n
        self.trainer.storage.put_scalars(skipped_images=n, skipped_images_total=self.total, smoothing_hint=False)
