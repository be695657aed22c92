"""Pre-training through detectron2's engine: a run stopped after a checkpoint and resumed
continues the loss curve of an uninterrupted run exactly (CPU, fixed seeds).

The loop is ``itpn_d2.engine.lazyconfig_run.do_train`` with stock detectron2 parts
(SimpleTrainer, LRScheduler, DetectionCheckpointer + PeriodicCheckpointer), the model,
optimizer and schedule from ``configs/pretrain/mim_mfm_itpn_tiny_cpu.py``, and an in-memory
data stream whose batch depends only on the iteration.
"""
import math
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import HookBase, SimpleTrainer, hooks
from detectron2.utils.events import get_event_storage

MAX_ITER = 8
PERIOD = 4  # checkpoints after iterations 3 and 7 (model_0000003.pth, model_final.pth)
STOP_AFTER = 5  # the interrupted run dies after iteration 5, past its last checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


class IterationData:
    """Infinite stream of 2 images of 64 px; the batch is a function of the current iteration,
    so a resumed run sees the same data as an uninterrupted one."""

    def __iter__(self):
        while True:
            it = get_event_storage().iter
            g = torch.Generator().manual_seed(1000 + it)
            low = torch.rand(2, 3, 8, 8, generator=g)
            images = torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
            yield [{"image": im * 255} for im in images]


class Reseed(HookBase):
    """detectron2 does not checkpoint RNG state; seeding the global RNG (masks, drop path)
    from the iteration makes every step reproducible on its own."""

    def before_step(self):
        torch.manual_seed(self.trainer.iter)


class Record(HookBase):
    def __init__(self, log):
        self.log = log

    def after_step(self):
        s = self.trainer.storage
        self.log[self.trainer.iter] = {
            k: s.history(k).latest()
            for k in ("total_loss", "loss_mim", "loss_mfm_p2", "loss_mfm_p3", "loss_mfm_p4", "lr", "ema_momentum")
        }


class Interrupt(HookBase):
    def after_step(self):
        if self.trainer.iter == STOP_AFTER:
            raise _Stopped()


class _Stopped(Exception):
    pass


def _run(repo_root, out_dir, *, resume=False, interrupt=False, init_seed=0):
    cfg = LazyConfig.load(os.path.join(repo_root, "configs/pretrain/mim_mfm_itpn_tiny_cpu.py"))
    cfg.train.max_iter = MAX_ITER
    cfg.model.teacher.max_iter = MAX_ITER
    cfg.train.output_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)  # default_setup does this in the training script
    torch.manual_seed(init_seed)
    model = instantiate(cfg.model).to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    trainer = SimpleTrainer(model, IterationData(), optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    log = {}
    trainer.register_hooks(
        [
            Reseed(),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, period=PERIOD, max_iter=MAX_ITER),
            Record(log),
        ]
        + ([Interrupt()] if interrupt else [])
    )
    checkpointer.resume_or_load("", resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    try:
        trainer.train(start_iter, MAX_ITER)
    except _Stopped:
        pass
    return log, model


def test_resume_continues_the_same_loss_curve(tmp_path, repo_root):
    full, full_model = _run(repo_root, tmp_path / "full")
    assert sorted(full) == list(range(MAX_ITER))
    assert all(math.isfinite(v["total_loss"]) for v in full.values())
    assert full[0]["lr"] < full[2]["lr"], "linear warm-up"
    assert full[0]["ema_momentum"] == pytest.approx(0.99)

    part, _ = _run(repo_root, tmp_path / "resumed", interrupt=True)
    assert sorted(part) == list(range(STOP_AFTER + 1))
    assert os.path.isfile(tmp_path / "resumed" / "model_0000003.pth")
    # a different init proves the resumed weights come from the checkpoint
    rest, rest_model = _run(repo_root, tmp_path / "resumed", resume=True, init_seed=123)
    assert sorted(rest) == list(range(PERIOD, MAX_ITER)), "resumes after the last checkpoint (iteration 3)"

    for it in range(MAX_ITER):
        resumed = part[it] if it < PERIOD else rest[it]
        for k, v in full[it].items():
            assert resumed[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (it, k, resumed[k], v)
    # the EMA teacher (part of the model state) was restored and kept averaging
    for (k, a), b in zip(full_model.state_dict().items(), rest_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k
