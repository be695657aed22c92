"""The integral ablation (itpn_d2.experiments, tools/ablate_integral.py): its statistics
(t-interval, exact sign test), the reporting on fake runs (table, paired claims, plots), the
commands it runs (pre-training kinds, tasks), reuse of finished runs, and the FLOPs per
pre-training iteration (the runs themselves are the experiment, not a test)."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import cv2
import pytest
import torch

from itpn_d2.evaluation import paired_stats as stats
from itpn_d2.experiments import ablation_report as report
from itpn_d2.experiments import integral_ablation
from itpn_d2.experiments.ablation_variants import PRETRAIN_CFG, make_tasks
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def ablate():
    # the module whose run() / pretrain_flops() the tests replace: run_ablation calls them there
    return integral_ablation


# ---------------------------------------------------------------- statistics


def test_t_quantiles_and_sign_test():
    # Student's t 97.5% quantiles (any table): df 1, 4, 10, 29
    for df, q in ((1, 12.7062), (4, 2.7764), (10, 2.2281), (29, 2.0452)):
        assert stats.t_ppf(0.975, df) == pytest.approx(q, abs=2e-4), df
    assert stats.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert stats.t_cdf(-2.7764, 4) == pytest.approx(0.025, abs=1e-5)
    # exact sign test: 5 of 5 positive is p = 2/32; 4 of 5 is 2*6/32
    assert stats.sign_test_p(5, 0) == pytest.approx(0.0625)
    assert stats.sign_test_p(1, 4) == pytest.approx(0.375)
    assert stats.sign_test_p(6, 0) == pytest.approx(0.03125)
    assert stats.sign_test_p(0, 0) == 1.0


def test_paired_differences():
    a = {0: 10.0, 1: 12.0, 2: 11.0, 3: 13.0, 4: 9.0, 7: 99.0}  # seed 7 has no partner: left out
    b = {0: 9.0, 1: 10.0, 2: 10.5, 3: 10.0, 4: 8.0, 5: 0.0}
    p = stats.paired(a, b)
    d = [1.0, 2.0, 0.5, 3.0, 1.0]
    assert p["seeds"] == SEEDS and p["diffs"] == d and p["n"] == 5
    half = 2.7764 * 1.0 / math.sqrt(5)  # sd of d is exactly 1
    assert p["mean"] == pytest.approx(1.5) and p["sd"] == pytest.approx(1.0)
    assert p["ci95"] == pytest.approx([1.5 - half, 1.5 + half], abs=1e-3)
    assert p["sign"] == {"pos": 5, "neg": 0, "ties": 0, "p": pytest.approx(0.0625)}
    assert stats.verdict(p) == "established: higher"  # the interval [0.26, 2.74] is above 0
    b[4] = 9.0  # d = [1, 2, 0.5, 3, 0]: mean 1.3, interval [-0.20, 2.80], one tie
    p = stats.paired(a, b)
    assert p["ci95"][0] < 0 < p["ci95"][1] and stats.verdict(p) == "not established"
    assert p["sign"] == {"pos": 4, "neg": 0, "ties": 1, "p": pytest.approx(0.125)}
    assert stats.verdict(stats.paired({0: 1.0, 1: 0.0}, {0: 0.0, 1: 1.0})) == "not established"
    # two seeds that agree give a narrow interval above 0: suggested, not established
    two = stats.paired({0: 3.0, 1: 3.1}, {0: 0.0, 1: 0.0})
    assert two["ci95"][0] > 0 and stats.verdict(two) == "suggested: higher (n = 2 < 5 seeds)"
    assert stats.verdict(two, min_pairs=2) == "established: higher"
    assert stats.verdict(stats.paired({0: 1.0}, {0: 0.0})).startswith("n/a")
    # a diverged run (NaN or inf on either side) is left out and named, not averaged or tied
    a[1], b[3] = float("nan"), float("inf")
    p = stats.paired(a, b)
    assert p["non_finite_seeds"] == [1, 3] and p["seeds"] == [0, 2, 4] and p["n"] == 3
    assert p["mean"] == pytest.approx((1.0 + 0.5 + 0.0) / 3) and p["sign"]["ties"] == 1
    assert "seeds [1, 3] left out" in report._fmt_ci(p)


# ---------------------------------------------------------------- reporting on fake results


def _run(task, variant, seed, value, budget="iters"):
    metrics = {"box_AP": value, "mask_AP": value - 1} if task == "det" else {"mIoU": value}
    first = {m: v / 2 for m, v in metrics.items()}
    return {"task": task, "variant": variant, "budget": budget, "seed": seed,
            "loss": [(9, 3.0), (19, 2.0), (29, 1.0 + seed)], "evals": [(100, first), (200, metrics)], "final": metrics}


def _fake_runs():
    runs = []
    for s in SEEDS:
        runs.append(_run("det", "scratch", s, 2.0 + s))
        runs.append(_run("det", "backbone_only", s, 10.0 + s))
        runs.append(_run("det", "integral_mim", s, 12.0 + s + 0.1 * s))  # +2.0 .. +2.4: established
        runs.append(_run("det", "integral_mim_mfm", s, 12.0 + s + (0.5 if s % 2 else -0.5)))  # mixed
        runs.append(_run("det", "backbone_only", s, 11.0 + s, budget="flops"))
        runs.append(_run("det", "integral_mim", s, 12.0 + s, budget="flops"))
        runs.append(_run("seg", "backbone_only", s, 30.0 + s))
        runs.append(_run("seg", "integral_mim", s, 29.0 + s))  # -1 every seed
    return runs


def _tasks(tmp_path):
    seg_cfg = tmp_path / "seg_tiny.py"  # the real segmentation config is another issue's
    seg_cfg.write_text("# fake\n")
    return make_tasks(["det", "seg"], seg_config=str(seg_cfg))


def test_table_claims_report_and_plots(tmp_path):
    tasks = _tasks(tmp_path)
    variants = ["scratch", "backbone_only", "integral_mim", "integral_mim_mfm"]
    runs = _fake_runs()
    table = report.summarise(runs, tasks, variants, ["iters", "flops"])
    row = {(t["task"], t["budget"], t["variant"]): t for t in table}
    r = row[("det", "iters", "backbone_only")]
    assert r["seeds"] == 5 and r["box_AP"] == [12.0, pytest.approx(math.sqrt(2.5))] and r["mask_AP"][0] == 11.0
    assert r["box_AP_first_eval"][0] == 6.0 and r["box_AP_curve"] == [6.0, 12.0] and r["eval_iters"] == [100, 200]
    # scratch pre-trains nothing: the same runs stand in both budgets
    assert row[("det", "flops", "scratch")]["box_AP"] == row[("det", "iters", "scratch")]["box_AP"]
    assert row[("det", "flops", "backbone_only")]["box_AP"][0] == 13.0
    assert ("det", "flops", "integral_mim_mfm") not in row  # not run at that budget
    assert row[("seg", "iters", "integral_mim")]["mIoU"][0] == 31.0

    cl = report.claims(runs, tasks, variants, ["iters", "flops"])
    by = {(c["task"], c["budget"], c["a"], c["b"], c["metric"], c["when"]): c for c in cl}
    c = by[("det", "iters", "integral_mim", "backbone_only", "box_AP", "final")]
    assert c["diffs"] == pytest.approx([2.0, 2.1, 2.2, 2.3, 2.4]) and c["verdict"] == "established: higher"
    assert c["sign"]["pos"] == 5 and c["sign"]["p"] == pytest.approx(0.0625)
    assert by[("det", "iters", "integral_mim", "backbone_only", "box_AP", "first_eval")]["mean"] == pytest.approx(1.1)
    mfm = by[("det", "iters", "integral_mim_mfm", "integral_mim", "box_AP", "final")]
    assert mfm["verdict"] == "not established" and (mfm["sign"]["pos"], mfm["sign"]["neg"]) == (2, 3)
    assert by[("det", "flops", "integral_mim", "backbone_only", "mask_AP", "final")]["mean"] == pytest.approx(1.0)
    assert by[("seg", "iters", "integral_mim", "backbone_only", "mIoU", "final")]["verdict"] == "established: lower"
    assert not any(k[2] == "encoder_only" for k in by)  # a claim whose variant did not run is left out

    flops = {"mim": {"student_fwd": 1e8, "teacher_fwd": 0.0, "batch": 16, "per_iter": 4.8e9,
                     "iterations": {"iters": 500, "flops": 900}}}
    curves = {"mim": {0: [[19, 0.9], [39, 0.8], [59, 0.7]]}, "backbone_only": {0: [[19, 1.0], [39, 0.9], [59, 0.9]]}}
    mim = report.mim_claim(curves, last=2)
    assert mim["diffs"] == [pytest.approx(0.75 - 0.9)] and mim["verdict"].startswith("n/a")
    md = report.write_report(table, cl, flops, mim, str(tmp_path / "results.md"))
    assert "| mim | 0.100 | 0.000 | 16 | 4.80 | 500 / 900 |" in md
    assert "Task det, pre-training budget: equal flops" in md and "Task seg, pre-training budget: equal iters" in md
    assert ("| backbone_only | 5 | 12.0 ± 1.6 | 11.0 ± 1.6 | s0 10.0, s1 11.0, s2 12.0, s3 13.0, s4 14.0 "
            "| s0 9.0, s1 10.0, s2 11.0, s3 12.0, s4 13.0 | 6.0 / 12.0 | 5.5 / 11.0 |") in md
    # per seed in seed order, however the runs come
    shuffled = {(t["task"], t["budget"], t["variant"]): t
                for t in report.summarise(list(reversed(runs)), tasks, variants, ["iters"])}
    assert shuffled[("det", "iters", "backbone_only")]["seed_ids"] == [0, 1, 2, 3, 4]
    assert shuffled[("det", "iters", "backbone_only")]["box_AP_by_seed"] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert ("| det | iters | pyramid pre-trained vs backbone-only (the paper's baseline) "
            "(integral_mim - backbone_only) "
            "| box_AP | final | 5 | +2.20 | [+2.00, +2.40] | 5 / 0 / 0 | 0.062 | established: higher |") in md
    assert (tmp_path / "results.md").read_text().strip() == md.strip()
    # the summary on top: final evaluation, one column per task and metric, verdicts in words
    summary = report.summary_table(cl)
    assert summary[0] == "| budget | claim (a - b) | det box_AP | det mask_AP | seg mIoU |"
    row = [ln for ln in summary if ln.startswith("| equal iters | pyramid pre-trained vs backbone-only")][0]
    assert "| +2.20 [+2.00, +2.40] n=5 **established: higher** |" in row and "**established: lower**" in row
    mfm_row = [ln for ln in summary if ln.startswith("| equal iters | MFM vs not")][0]
    assert "**" not in mfm_row.split("|")[3]  # not established: no verdict shown
    assert md.startswith("Summary: paired per-seed differences") and summary[2] in md
    lone = {"when": "final", "task": "det", "metric": "box_AP", "budget": "iters", "claim": "c", "a": "x",
            "b": "y", "n": 1, "mean": float("nan"), "ci95": None, "verdict": "n/a (fewer than 2 pairs)"}
    assert report.summary_table([lone])[-1] == "| equal iters | c (x - y) | n=1 |"
    paths = report.plot(runs, table, tasks, variants, ["iters", "flops"], str(tmp_path))
    report.plot_mim(curves, flops, str(tmp_path / "mim_loss.png"))
    for p in paths + [str(tmp_path / "mim_loss.png")]:
        assert cv2.imread(p) is not None, p
    assert sorted(os.path.basename(p) for p in paths) == ["curves_det.png", "curves_seg.png"]


def test_tasks_name_missing_configs(tmp_path):
    with pytest.raises(ValueError, match="--seg-config"):
        make_tasks(["seg"], seg_config=None)
    missing = str(tmp_path / "nope.py")
    with pytest.raises(FileNotFoundError, match="nope.py.*--seg-config"):
        make_tasks(["seg"], seg_config=missing)
    with pytest.raises(FileNotFoundError, match="--det-config"):
        make_tasks(["det"], det_config=missing)


def test_default_tasks_are_the_demo_stages_with_their_own_schedules():
    """By default the experiment fine-tunes as `make demo` did when it ran (the detection config
    frozen at that recipe, below): both tasks, each for its config's own number of iterations (no
    single count forced on detection and segmentation)."""
    from detectron2.config import LazyConfig

    from itpn_d2.experiments import AblationOptions
    from itpn_d2.utils.checkout import REPO_ROOT

    options = AblationOptions()
    assert options.finetune_iters is None and tuple(options.tasks) == ("det", "seg")
    tasks = make_tasks(options.tasks, options.det_config, options.seg_config)
    for name, cfg in (("det", "configs/COCO/mask_rcnn_itpn_tiny_ablation.py"), ("seg", "configs/ADE20K/uper_itpn_tiny_demo.py")):
        assert tasks[name].config == cfg
        assert tasks[name].max_iter() == LazyConfig.load(os.path.join(REPO_ROOT, cfg)).train.max_iter
    assert tasks["det"].max_iter() != tasks["seg"].max_iter()


@pytest.mark.parametrize("task", ["det", "seg"])
def test_the_default_tasks_give_the_recipes_the_committed_runs_saved(task):
    """docs/ablation/recipes/ holds what the committed runs saved (their config.yaml outside
    ``train:``); the tool reuses a run only when the task's config gives the same, so a config
    edited since would make the committed results unreproducible (and the tool refuse them)."""
    from itpn_d2.experiments.integral_ablation import saved_recipe
    from itpn_d2.utils.checkout import REPO_ROOT

    t = make_tasks(["det", "seg"])[task]
    with open(os.path.join(REPO_ROOT, "docs", "ablation", "recipes", f"{task}.yaml")) as f:
        committed = f.read().splitlines()
    assert saved_recipe(t.config, t.extra) == committed


def test_the_ablation_detection_config_is_the_demo_as_it_was():
    """The frozen detection config differs from the demo's only where the demo moved on."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling.poolers import ROIPooler

    from itpn_d2.modeling import ROIPoolerFP32Boxes, hivit_arch
    from itpn_d2.utils.checkout import REPO_ROOT

    frozen = LazyConfig.load(os.path.join(REPO_ROOT, make_tasks(["det"])["det"].config))
    demo = LazyConfig.load(os.path.join(REPO_ROOT, "configs/COCO/mask_rcnn_itpn_tiny_demo.py"))
    assert frozen.train.max_iter == 1000 and frozen.lr_multiplier.scheduler.milestones == [800, 930]
    assert tuple(frozen.model.proposal_generator.post_nms_topk) == (500, 200)
    for cfg, pooler in ((frozen, ROIPooler), (demo, ROIPoolerFP32Boxes)):
        cfg.model.backbone.net.update(hivit_arch("tiny"))
        assert type(instantiate(cfg.model).roi_heads.box_pooler) is pooler
    for c in (frozen, demo):
        c.model.roi_heads.box_pooler._target_ = c.model.roi_heads.mask_pooler._target_ = ROIPooler
        c.train.max_iter = c.train.eval_period = 0
        c.lr_multiplier = None
        c.model.proposal_generator.pre_nms_topk = c.model.proposal_generator.post_nms_topk = None
        c.dataloader.train.num_workers = c.dataloader.test.num_workers = None  # no effect on the stream
    assert LazyConfig.to_py(frozen) == LazyConfig.to_py(demo)


# ---------------------------------------------------------------- commands, reuse


@pytest.mark.parametrize("kind", ["mim", "mim_mfm", "backbone_only"])
def test_pretraining_commands_build_the_intended_models(ablate, tmp_path, monkeypatch, kind):
    from detectron2.config import LazyConfig

    from itpn_d2.config.overrides import apply_overrides

    seen = []
    monkeypatch.setattr(ablate, "run", lambda cmd, log: seen.append(cmd))
    ablate.pretrain(kind, str(tmp_path / "pt"), 7, seed=3)
    (cmd,) = seen
    cfg_path = cmd[cmd.index("--config-file") + 1]
    overrides = [c for c in cmd[cmd.index("--config-file") + 2:] if c != "--resume"]
    assert "--resume" in cmd  # an interrupted pre-training continues
    cfg = apply_overrides(LazyConfig.load(os.path.join(ROOT, cfg_path)), overrides)
    assert cfg.train.max_iter == 7 and cfg.train.seed == 3
    assert (cfg.model.mfm_decoder is None) == (kind != "mim_mfm") and (cfg.model.teacher is None) == (kind != "mim_mfm")
    assert cfg.model.use_pyramid == (kind != "backbone_only")
    assert cfg.dataloader.train.seed == 0  # the config's data stream unless one is asked for
    ablate.pretrain(kind, str(tmp_path / "pt_data"), 7, seed=3, data_seed=5)
    cmd = seen[-1]
    cfg = apply_overrides(LazyConfig.load(os.path.join(ROOT, cfg_path)),
                          [c for c in cmd[cmd.index("--config-file") + 2:] if c != "--resume"])
    assert cfg.train.seed == 3 and cfg.dataloader.train.seed == 5
    # a finished one is reused
    (tmp_path / "pt" / "model_final.pth").write_bytes(b"")
    assert ablate.pretrain(kind, str(tmp_path / "pt"), 7) == str(tmp_path / "pt" / "model_final.pth") and len(seen) == 2


@pytest.mark.parametrize("cfg", ["configs/COCO/mask_rcnn_itpn_tiny_demo.py", "configs/ADE20K/uper_itpn_tiny_demo.py",
                                 PRETRAIN_CFG, "configs/pretrain/mim_backbone_only_itpn_tiny_cpu.py"])
def test_the_data_seed_override_reaches_the_train_loader(cfg):
    """--vary-data sets dataloader.train.seed: a key the ablation's configs already have (the
    resumable loader's seed), so the override changes the data stream instead of adding a stray key."""
    from detectron2.config import LazyConfig

    from itpn_d2.data.resumable import build_resumable_train_loader

    base = LazyConfig.load(os.path.join(ROOT, cfg))
    assert base.dataloader.train._target_ is build_resumable_train_loader and base.dataloader.train.seed == 0
    varied = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, cfg)), integral_ablation._data_overrides(4))
    assert varied.dataloader.train.seed == 4


def test_finished_runs_are_read_back_not_rerun(ablate, tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "run", lambda cmd, log: pytest.fail("a finished run was re-run"))
    tasks = _tasks(tmp_path)
    out = tmp_path / "ft"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"")
    rows = [{"iteration": 9, "total_loss": 2.5},
            {"iteration": 99, "bbox/AP": float("nan")},  # no detections yet: NaN box AP, no segm row
            {"iteration": 200, "total_loss": 9.0},  # cut short, then resumed: the later record wins
            {"iteration": 300, "bbox/AP": 4.0, "segm/AP": 3.0, "total_loss": 1.5}]
    (out / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n" + json.dumps(
        {"iteration": 200, "total_loss": 2.0}) + "\n")
    r = ablate.finetune(tasks["det"], "scratch", None, "strict", 0, 300, 3, str(out))
    assert r["evals"] == [(100, {"box_AP": 0.0, "mask_AP": 0.0}), (300, {"box_AP": 4.0, "mask_AP": 3.0})]
    assert r["final"] == {"box_AP": 4.0, "mask_AP": 3.0} and r["loss"] == [(9, 2.5), (200, 2.0), (300, 1.5)]
    (out / "metrics.json").write_text(json.dumps({"iteration": 299, "sem_seg/mIoU": 41.5}) + "\n")
    r = ablate.finetune(tasks["seg"], "scratch", None, "strict", 0, 300, 3, str(out))
    assert r["final"] == {"mIoU": 41.5} and r["task"] == "seg"


def test_a_run_from_another_checkpoint_is_refused_not_reused(ablate, tmp_path, monkeypatch):
    """A finished (or part-done) fine-tuning folder is reused only if it loaded the checkpoint the
    experiment asks for; otherwise the error names both (as the training script saves config.yaml)."""
    monkeypatch.setattr(ablate, "run", lambda cmd, log: pytest.fail("a mismatched run was (re)run"))
    tasks = _tasks(tmp_path)
    out = tmp_path / "ft"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"")
    (out / "metrics.json").write_text(json.dumps({"iteration": 299, "bbox/AP": 4.0, "segm/AP": 3.0}) + "\n")
    (out / "config.yaml").write_text("model:\n  init_checkpoint: nope\ntrain:\n  amp: {enabled: false}\n"
                                     "  init_checkpoint: /runs/pretrain_mim_500it_s0/model_final.pth\n  seed: 1\n")
    r = ablate.finetune(tasks["det"], "integral_mim", "/runs/pretrain_mim_500it_s0/model_final.pth", "strict", 1,
                        300, 3, str(out))
    assert r["final"] == {"box_AP": 4.0, "mask_AP": 3.0}
    with pytest.raises(RuntimeError, match="pretrain_mim_500it_s0.*pretrain_mim_500it_s1"):
        ablate.finetune(tasks["det"], "integral_mim", "/runs/pretrain_mim_500it_s1/model_final.pth", "strict", 1,
                        300, 3, str(out))
    with pytest.raises(RuntimeError, match="scratch"):
        ablate.finetune(tasks["det"], "scratch", None, "strict", 1, 300, 3, str(out))


def test_a_run_with_another_recipe_is_refused_not_reused(ablate, tmp_path, monkeypatch):
    """A folder whose saved config differs outside ``train:`` from what the task's config gives now
    (the config was edited after the run) is refused, with the differing lines; one that matches is reused."""
    monkeypatch.setattr(ablate, "run", lambda cmd, log: pytest.fail("a finished run was rerun"))
    cfg = tmp_path / "cfg.py"
    cfg.write_text("model = dict(head=dict(channels=64))\ntrain = dict(seed=0, init_checkpoint='')\n")
    task = ablate.Task("seg", str(cfg), {"mIoU": "sem_seg/mIoU"})
    recipe = ablate.saved_recipe(str(cfg), task.extra)
    out = tmp_path / "ft"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"")
    (out / "metrics.json").write_text(json.dumps({"iteration": 299, "sem_seg/mIoU": 20.0}) + "\n")
    from detectron2.config import LazyConfig

    run_cfg = LazyConfig.load(str(cfg))
    run_cfg.train.seed = 3  # train: differs by design between runs
    LazyConfig.save(run_cfg, str(out / "config.yaml"))
    assert ablate.finetune(task, "scratch", None, "strict", 3, 300, 3, str(out), recipe=recipe)["final"] == {"mIoU": 20.0}
    cfg.write_text("model = dict(head=dict(channels=64, class_weight=[1.0, 2.0]))\n"
                   "train = dict(seed=0, init_checkpoint='')\n")
    with pytest.raises(RuntimeError, match=r"another recipe(.|\n)*\+ *class_weight"):
        ablate.finetune(task, "scratch", None, "strict", 3, 300, 3, str(out),
                        recipe=ablate.saved_recipe(str(cfg), task.extra))


def test_main_runs_every_job_once_and_resumes(ablate, tmp_path, monkeypatch):
    """The whole experiment (run_ablation, what the tool runs) on fake runs: the jobs it launches
    (configs, load modes, budgets, checkpoints), the files it writes; a second call launches nothing."""
    seg_cfg = tmp_path / "seg_tiny.py"
    seg_cfg.write_text("# fake\n")
    fake_flops = {"backbone_only": 3e9, "mim": 4.5e9, "mim_mfm": 9e9}
    monkeypatch.setattr(ablate, "pretrain_flops", lambda k: {"student_fwd": fake_flops[k] / 48, "teacher_fwd": 0.0,
                                                             "batch": 16, "per_iter": fake_flops[k]})
    launched = []

    def fake_run(cmd, log):
        launched.append(cmd)
        opts = dict(c.split("=", 1) for c in cmd if "=" in c)
        out = opts["train.output_dir"]
        seed = int(opts["train.seed"])
        cfg = cmd[cmd.index("--config-file") + 1]
        rows = []
        if "pretrain" in cfg:
            n = int(opts["train.max_iter"])
            mim_only = "model.teacher=null" in cmd or "backbone_only" in cfg
            for it in range(19, n, 20):
                loss = 1.0 - it / 1000 + (0.05 if "backbone_only" in cfg else 0.0)
                rows.append({"iteration": it, **({"total_loss": loss} if mim_only else
                                                 {"loss_mim": loss, "loss_mfm_p2": 0.3, "total_loss": loss + 0.3})})
        else:
            n = int(opts["train.max_iter"])
            base = {"encoder_only": 2.0}.get(opts["train.backbone_load"], 0.0) + seed
            base += 3.0 if opts["train.init_checkpoint"] else 0.0
            det = "COCO" in cfg
            key = {"bbox/AP": base, "segm/AP": base - 1} if det else {"sem_seg/mIoU": 20 + base}
            rows = [{"iteration": 9, "total_loss": 2.0}, {"iteration": n // 2 - 1, **key}, {"iteration": n - 1, **key}]
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
        open(os.path.join(out, "model_final.pth"), "wb").close()

    monkeypatch.setattr(ablate, "run", fake_run)
    out = tmp_path / "abl"
    options = ablate.AblationOptions(output_dir=str(out), seeds=[0, 1], pretrain_iters=100, finetune_iters=20,
                                     evals=2, tasks=["det", "seg"], seg_config=str(seg_cfg))
    ablate.run_ablation(options)
    assert not [c for c in launched if any(x.startswith("dataloader.train.seed=") for x in c)]  # data seed 0 throughout
    pre = [c for c in launched if "pretrain" in c[c.index("--config-file") + 1]]
    ft = [c for c in launched if c not in pre]
    dirs = sorted(os.path.basename(dict(x.split("=", 1) for x in c if "=" in x)["train.output_dir"]) for c in pre)
    # equal iterations: 100 each; equal FLOPs: 100 x 9 / 3 = 300 and 100 x 9 / 4.5 = 200 (mim_mfm's is shared)
    # by default one pre-training per fine-tuning seed, with that seed
    assert dirs == sorted(f"pretrain_{k}_s{s}" for s in (0, 1) for k in (
        "backbone_only_100it", "backbone_only_300it", "mim_100it", "mim_200it", "mim_mfm_100it"))
    # each pre-training is run when its seed's fine-tunings need it: seed 1's after seed 0's runs began
    order = [os.path.basename(dict(x.split("=", 1) for x in c if "=" in x)["train.output_dir"]) for c in launched]
    assert order.index("pretrain_mim_100it_s1") > order.index("ft_seg_integral_mim_s0")
    # 2 tasks x 2 seeds x (scratch and integral_mim_mfm once: its pre-training, the most expensive per
    # iteration, sets the FLOPs budget, so its fine-tunings are the same runs under both budgets;
    # + 3 pre-trained variants x 2 budgets)
    assert len(ft) == 2 * 2 * (2 + 3 * 2)
    assert not [c for c in ft if "integral_mim_mfm@flops" in " ".join(c)]
    # seed by seed, each seed's runs of both tasks together (equal iterations first): an experiment
    # stopped part-way leaves whole paired seeds for every task
    ft_dirs = [dict(x.split("=", 1) for x in c if "=" in x)["train.output_dir"].rsplit("/", 1)[1] for c in ft]
    iters_runs = [(d.rsplit("_s", 1)[1], d.split("_")[1]) for d in ft_dirs if "@flops" not in d]
    assert ft_dirs.index(next(d for d in ft_dirs if "@flops" in d)) == len(iters_runs)
    assert iters_runs == sorted(iters_runs, key=lambda r: r[0]) and iters_runs[0][0] == "0"
    assert {t for s_, t in iters_runs[: len(iters_runs) // 2]} == {"det", "seg"}
    loads = {dict(x.split("=", 1) for x in c if "=" in x)["train.output_dir"].rsplit("/", 1)[1]:
             dict(x.split("=", 1) for x in c if "=" in x) for c in ft}
    assert loads["ft_det_backbone_only_s0"]["train.backbone_load"] == "encoder_only"
    for run_dir, pre in (("ft_det_backbone_only_s0", "pretrain_backbone_only_100it_s0"),
                         ("ft_seg_encoder_only@flops_s1", "pretrain_mim_200it_s1"),
                         ("ft_det_integral_mim_mfm_s1", "pretrain_mim_mfm_100it_s1")):
        assert loads[run_dir]["train.init_checkpoint"].endswith(f"{pre}/model_final.pth"), run_dir
    assert loads["ft_det_scratch_s0"]["train.init_checkpoint"] == ""

    res = json.loads((out / "results.json").read_text())
    assert res["flops"]["backbone_only"]["iterations"] == {"iters": 100, "flops": 300}
    assert len(res["runs"]) == 2 * 2 * (2 + 3 * 2)
    flops_rows = {(t["task"], t["variant"]): t for t in res["table"] if t["budget"] == "flops"}
    assert set(flops_rows) == {(t, v) for t in ("det", "seg") for v in ablate.VARIANTS}  # every variant at both budgets
    iters_mfm = [t for t in res["table"] if t["budget"] == "iters" and (t["task"], t["variant"]) == ("det", "integral_mim_mfm")]
    assert flops_rows[("det", "integral_mim_mfm")]["box_AP_by_seed"] == iters_mfm[0]["box_AP_by_seed"]
    assert [c for c in res["claims"] if c["budget"] == "flops" and c["a"] == "integral_mim_mfm" and c["b"] == "integral_mim"]
    assert set(res["mim_curves"]) == {"backbone_only", "mim", "mim_mfm"}
    assert res["mim_curves"]["backbone_only"]["0"][0] == [19, pytest.approx(1.031)]
    assert res["mim_claim"]["diffs"] == [pytest.approx(-0.05)] * 2  # paired per pre-training seed
    claim = [c for c in res["claims"] if c["a"] == "integral_mim" and c["b"] == "encoder_only"
             and c["task"] == "det" and c["metric"] == "box_AP" and c["when"] == "final" and c["budget"] == "iters"]
    assert claim[0]["diffs"] == [-2.0, -2.0]
    for f in ("results.md", "curves_det.png", "curves_seg.png", "mim_loss.png", "flops.json"):
        assert (out / f).exists(), f

    # a given MIM + MFM checkpoint (make demo's) stands in for the equal-iterations one
    demo = tmp_path / "demo" / "pretrain"
    demo.mkdir(parents=True)
    torch.save({"model": {}, "iteration": 99}, demo / "model_final.pth")  # saved at the end of 100 iterations
    (demo / "metrics.json").write_text(json.dumps({"iteration": 19, "loss_mim": 0.5, "total_loss": 0.8}) + "\n")
    launched.clear()
    out2 = tmp_path / "abl2"
    ablate.run_ablation(replace(options, output_dir=str(out2), variants=["integral_mim_mfm"], budgets=["iters"],
                                tasks=["det"], pretrain_seeds=[0], pretrain_mim_mfm=str(demo / "model_final.pth")))
    assert [c for c in launched if "pretrain" in c[c.index("--config-file") + 1]] == []
    assert (out2 / "pretrain_mim_mfm_100it_s0" / "model_final.pth").read_bytes() == (demo / "model_final.pth").read_bytes()
    assert json.loads((out2 / "results.json").read_text())["mim_curves"] == {"mim_mfm": {"0": [[19, 0.5]]}}
    with pytest.raises(ablate.AblationError, match="no such file"):
        ablate.run_ablation(replace(options, pretrain_mim_mfm=str(tmp_path / "nope.pth")))
    # a pre-training of another length (make demo's 700 iterations) must not stand for this budget's
    longer = tmp_path / "longer.pth"
    torch.save({"model": {}, "iteration": 699}, longer)
    with pytest.raises(ablate.AblationError, match=r"longer.pth: saved at iteration 699, .* runs 100 iterations"):
        ablate.run_ablation(replace(options, output_dir=str(tmp_path / "abl3"), pretrain_mim_mfm=str(longer)))
    assert not (tmp_path / "abl3" / "pretrain_mim_mfm_100it_s0" / "model_final.pth").exists()

    # --vary-data: every run's data seed is its own seed, in folders of their own (nothing reused
    # from the data-seed-0 runs in the same output folder)
    from detectron2.config import LazyConfig

    from itpn_d2.config.overrides import apply_overrides

    def run_and_save_config(cmd, log):  # as the training script: config.yaml with the overrides applied
        fake_run(cmd, log)
        cfg = cmd[cmd.index("--config-file") + 1]
        if "pretrain" not in cfg:
            overrides = [c for c in cmd[cmd.index("--config-file") + 2:] if c != "--resume"]
            out_dir = dict(c.split("=", 1) for c in overrides)["train.output_dir"]
            LazyConfig.save(apply_overrides(LazyConfig.load(os.path.join(ROOT, cfg)), overrides),
                            os.path.join(out_dir, "config.yaml"))

    monkeypatch.setattr(ablate, "run", run_and_save_config)
    launched.clear()
    varied = replace(options, vary_data=True, tasks=["det"], budgets=["iters"], variants=["scratch", "integral_mim"])
    ablate.run_ablation(varied)
    assert len(launched) == 2 + 2 * 2  # the two mim pre-trainings, then 2 variants x 2 seeds
    for c in launched:
        opts = dict(x.split("=", 1) for x in c if "=" in x)
        assert opts["dataloader.train.seed"] == opts["train.seed"] and opts["train.output_dir"].endswith("_data"), c
        if opts.get("train.init_checkpoint"):
            assert opts["train.init_checkpoint"].endswith(f"pretrain_mim_100it_s{opts['train.seed']}_data/model_final.pth")
    # finished: reused, each against the recipe with its own data seed; a folder run on another data
    # seed is refused, not reused
    launched.clear()
    ablate.run_ablation(varied)
    assert launched == []
    saved = out / "ft_det_scratch_s1_data" / "config.yaml"
    saved.write_text(saved.read_text().replace("seed: 1", "seed: 0"))
    with pytest.raises(ablate.AblationError, match="another recipe"):
        ablate.run_ablation(varied)
    monkeypatch.setattr(ablate, "run", fake_run)
    with pytest.raises(ablate.AblationError, match="--vary-data"):
        ablate.run_ablation(replace(options, vary_data=True, seeds=[1, 2], pretrain_mim_mfm=str(demo / "model_final.pth")))

    launched.clear()
    ablate.run_ablation(options)  # everything finished: reused, nothing launched
    assert launched == []
    ablate.run_ablation(replace(options, report_only=True, seeds=[0, 1, 2]))  # seed 2 not run: reported without it
    assert launched == [] and len(json.loads((out / "results.json").read_text())["runs"]) == 2 * 2 * 8


@pytest.mark.slow
def test_command_line_flags_and_errors(tmp_path):
    """tools/ablate_integral.py: one flag per AblationOptions field, with its defaults; an error
    of the experiment is one "[ablation] ..." line and exit status 1."""
    tool = os.path.join(ROOT, "tools", "ablate_integral.py")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    for field in integral_ablation.AblationOptions.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in r.stdout, field
    missing = str(tmp_path / "no_such_seg_config.py")
    r = subprocess.run([sys.executable, tool, "--output-dir", str(tmp_path / "abl"), "--tasks", "seg",
                        "--seg-config", missing], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    last = r.stderr.strip().splitlines()[-1]  # after any library warnings
    assert r.returncode == 1 and last.startswith(f"[ablation] task 'seg': config {missing} not found"), r.stderr
    assert "--seg-config" in last and not os.path.exists(tmp_path / "abl" / "flops.json")  # nothing was run


# ---------------------------------------------------------------- FLOPs


def test_pretrain_flops_per_iteration(ablate):
    """FLOP counts on the tiny configs (64 px, 2 attention blocks): the teacher costs one
    encoder forward on the full image; no pyramid < pyramid < pyramid + MFM."""
    import torch
    from detectron2.config import LazyConfig, instantiate

    from itpn_d2.utils.flops import forward_flops

    small = ["dataloader.train.mapper.image_size=64", "model.backbone.net.pretrain_img_size=64",
             "model.backbone.net.depth=2", "dataloader.train.total_batch_size=4"]
    f = {k: ablate.pretrain_flops(k, small + (["model.mfm_decoder.pretrain_img_size=64"] if k == "mim_mfm" else []))
         for k in ("backbone_only", "mim", "mim_mfm")}
    assert f["backbone_only"]["teacher_fwd"] == 0 == f["mim"]["teacher_fwd"]
    assert 0 < f["backbone_only"]["student_fwd"] < f["mim"]["student_fwd"] < f["mim_mfm"]["student_fwd"]
    for v in f.values():
        assert v["batch"] == 4 and v["per_iter"] == 4 * (3 * v["student_fwd"] + v["teacher_fwd"])
    cfg = LazyConfig.load(os.path.join(ROOT, PRETRAIN_CFG))
    cfg.model.backbone.net.pretrain_img_size = 64
    cfg.model.backbone.net.depth = 2
    net = instantiate(cfg.model.backbone.net).eval()
    enc = forward_flops(net, torch.zeros(1, 3, 64, 64))
    assert f["mim_mfm"]["teacher_fwd"] == enc
    its = ablate.budget_iters(f, 100)
    assert its["mim_mfm"] == 100 and its["backbone_only"] > its["mim"] > 100
