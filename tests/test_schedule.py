"""Schedules follow the batch set on the command line (issue: a command-line
``dataloader.train.total_batch_size`` must rescale lr, iterations, warm-up and LR steps)."""
import os

import pytest
from detectron2.config import LazyConfig, instantiate

from itpn_d2.config.overrides import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_IMAGES = 117266  # train2017 images with annotations (mmdet filter_empty_gt, detectron2 filter_empty)


def _cfg(rel, *overrides):
    return apply_overrides(LazyConfig.load(os.path.join(ROOT, "configs", rel)), list(overrides))


def _warmup_iters(sched, max_iter):
    """First iteration at which the multiplier reaches 1 (the end of the linear warm-up)."""
    lo, hi = 0, max_iter
    while lo < hi:
        mid = (lo + hi) // 2
        if sched(mid / max_iter) >= 1.0 - 1e-12:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _milestones(sched, max_iter):
    vals = [sched(i / max_iter) for i in range(max_iter)]
    return [i for i in range(1, max_iter) if vals[i] < vals[i - 1] - 1e-12 and i > _warmup_iters(sched, max_iter)]


def test_coco_default_is_the_release_point():
    cfg = _cfg("COCO/mask_rcnn_itpn_base_1x.py")
    assert cfg.dataloader.train.total_batch_size == 64
    assert cfg.optimizer.lr == pytest.approx(2e-4)
    assert cfg.train.max_iter == 12 * (COCO_IMAGES // 64) == 21984
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) == pytest.approx(0.001)
    assert _warmup_iters(sched, cfg.train.max_iter) == 500
    assert _milestones(sched, cfg.train.max_iter) == [9 * 1832, 11 * 1832]
    assert cfg.train.eval_period == cfg.train.checkpointer.period == 1832  # one epoch


@pytest.mark.parametrize("accum_override", [[], ["+train.grad_accum_steps=1"]])
def test_coco_command_line_batch_rescales_everything(accum_override):
    cfg = _cfg("COCO/mask_rcnn_itpn_base_1x.py", "dataloader.train.total_batch_size=16", *accum_override)
    assert cfg.optimizer.lr == pytest.approx(5e-5)
    assert cfg.train.max_iter == 12 * (COCO_IMAGES // 16) == 87948
    assert cfg.train.eval_period == cfg.train.checkpointer.period == 7329
    sched = instantiate(cfg.lr_multiplier)
    assert _warmup_iters(sched, cfg.train.max_iter) == 2000  # 500 x 64 images
    assert _milestones(sched, cfg.train.max_iter) == [9 * 7329, 11 * 7329]
    # the optimizer built from the config gets the rescaled lr (largest group: heads, factor 1)
    import torch

    cfg.optimizer.params.model = torch.nn.Linear(2, 2)
    opt = instantiate(cfg.optimizer)
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(5e-5)


def test_coco_grad_accumulation_counts_in_the_effective_batch():
    a = _cfg("COCO/mask_rcnn_itpn_base_3x.py", "dataloader.train.total_batch_size=16", "+train.grad_accum_steps=4")
    b = _cfg("COCO/mask_rcnn_itpn_base_3x.py")
    assert (a.optimizer.lr, a.train.max_iter) == (b.optimizer.lr, b.train.max_iter)
    assert b.optimizer.lr == pytest.approx(1.5e-4) and b.train.max_iter == 36 * 1832


def test_explicit_numbers_on_the_command_line_win():
    cfg = _cfg("COCO/mask_rcnn_itpn_large_1x.py", "train.max_iter=1200", "optimizer.lr=1e-4")
    assert cfg.train.max_iter == 1200 and cfg.optimizer.lr == 1e-4
    sched = instantiate(cfg.lr_multiplier)
    assert _milestones(sched, 1200) == [900, 1100]  # steps keep their epochs' fractions
    assert _warmup_iters(sched, 1200) == 500
    # 4000 warm-up iterations at batch 8 are longer than a 1200-iteration run: capped, no error
    short = _cfg("COCO/mask_rcnn_itpn_large_1x.py", "dataloader.train.total_batch_size=8", "train.max_iter=1200")
    assert _warmup_iters(instantiate(short.lr_multiplier), 1200) == 1200


@pytest.mark.parametrize(
    "rel", ["pretrain/mim_itpn_base_800ep.py", "pretrain/mim_mfm_itpn_base_800ep.py", "pretrain/mim_itpn_large_800ep.py"]
)
def test_pretraining_command_line_batch_rescales(rel):
    base = _cfg(rel)
    cfg = _cfg(rel, "dataloader.train.total_batch_size=1024")
    b0 = base.dataloader.train.total_batch_size
    assert cfg.optimizer.lr == pytest.approx(base.optimizer.lr * 1024 / b0)
    assert cfg.optimizer.lr == pytest.approx(1.5e-4 * 1024 / 256)
    assert cfg.train.max_iter == 800 * (1281167 // 1024)  # still 800 epochs, not 200
    assert cfg.lr_multiplier.warmup_length == pytest.approx(40 / 800)  # 40 epochs, a fraction
    if cfg.model.get("teacher") is not None:
        assert cfg.model.teacher.max_iter == cfg.train.max_iter


def test_resolved_after_a_yaml_round_trip(tmp_path):
    """default_setup saves the config as yaml; the interpolations survive and still resolve."""
    cfg = _cfg("COCO/mask_rcnn_itpn_base_1x.py")
    path = str(tmp_path / "config.yaml")
    LazyConfig.save(cfg, path)
    back = apply_overrides(LazyConfig.load(path), ["dataloader.train.total_batch_size=32"])
    assert back.optimizer.lr == pytest.approx(1e-4) and back.train.max_iter == 12 * (COCO_IMAGES // 32)


def test_a_batch_too_large_for_an_epoch_is_a_clear_error():
    cfg = _cfg("pretrain/mim_mfm_itpn_tiny_cpu.py", "dataloader.train.total_batch_size=32")
    with pytest.raises(Exception, match="no full batch"):
        cfg.train.max_iter


def test_clip_pretraining_final_lr_stays_absolute():
    """The CLIP recipe decays to lr 1e-5 (an absolute value): its cosine end point follows the batch."""
    for batch in (2048, 512):
        cfg = _cfg("pretrain/mim_clip_itpn_base_300ep.py", f"dataloader.train.total_batch_size={batch}")
        assert cfg.optimizer.lr == pytest.approx(1.5e-3 * batch / 2048)
        assert cfg.optimizer.lr * cfg.lr_multiplier.scheduler.end_value == pytest.approx(1e-5)
        assert cfg.train.max_iter == 300 * (1281167 // batch)
