"""tools/gpu_check.py (itpn_d2.benchmark.gpu_check): its CPU mode runs every stage through the
command line and writes one JSON with a number for every figure; a failing stage is recorded and
does not stop the others."""
import json
import math
import os
import subprocess
import sys

import pytest

from itpn_d2.benchmark import gpu_check
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
TOOL = os.path.join(ROOT, "tools", "gpu_check.py")


def _positive(fig, key):
    v = fig.get(key)
    assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (key, v, fig)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, TOOL, "--cpu", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    path = out / "gpu_check.json"
    assert path.exists(), r.stdout + r.stderr
    report = json.loads(path.read_text())
    # exit status 0 only when every stage is ok
    assert r.returncode == 0, json.dumps({k: v.get("error") for k, v in report["stages"].items()}, indent=1)
    return report, r.stdout


@pytest.mark.slow
def test_cpu_mode_every_stage_has_figures(cpu_report):
    report, stdout = cpu_report
    assert report["mode"] == "cpu" and report["device"] == "cpu"
    assert list(report["stages"]) == list(gpu_check.STAGES)
    for name, rec in report["stages"].items():
        assert rec["status"] == "ok", (name, rec.get("error"))
        assert rec["seconds"] > 0 and rec["command"]

    pre = report["stages"]["pretrain"]["figures"]
    for k in ("ours_img_per_s", "ours_s_per_iter", "ours_gflop_per_img", "ours_gflop_per_s",
              "matmul_gflop_per_s", "ours_fraction_of_matmul_rate", "ours_peak_memory_mib"):
        _positive(pre, k)
    # no mmpretrain reference at tiny sizes: said so, with the reason
    assert pre["reference"].startswith("reference unavailable: ") and pre["ratio_ours_over_reference"] is None
    assert pre["ours_mfu"] is None and "CPU" in pre["ours_mfu_note"]

    for name, ckpt in (("det", False), ("det_act_ckpt", True)):
        det = report["stages"][name]["figures"]
        assert det["activation_checkpointing"] is ckpt
        assert f"use_act_checkpoint={ckpt}" in report["stages"][name]["command"]
        for k in ("train_s_per_iter", "train_img_per_s", "train_peak_memory_mib", "train_peak_allocated_mib",
                  "inference_s_per_batch"):
            _positive(det, k)

    seg = report["stages"]["seg"]["figures"]
    assert seg["config"] == gpu_check.SEG_CONFIG
    for k in ("train_s_per_iter", "train_peak_memory_mib", "parameters_m"):
        _positive(seg, k)
    assert math.isfinite(seg["last_loss"])

    ft = report["stages"]["finetune"]["figures"]
    assert ft["device"] == "cpu" and ft["iterations"] == gpu_check.MODES["cpu"]["finetune"]["iters"]
    assert isinstance(ft["box_AP"], float) and 0.0 <= ft["box_AP"] <= 100.0
    _positive(ft, "s_per_iter_median")
    assert os.path.exists(ft["metrics"])

    m, v = report["machine"], report["versions"]
    for k in ("hostname", "cpu", "cpu_cores", "cuda_available", "gpu", "driver"):
        assert k in m
    for k in ("python", "torch", "torchvision", "detectron2", "timm", "mmpretrain", "git_commit"):
        assert k in v
    assert v["torch"] and v["detectron2"]
    assert report["total_seconds"] > 0
    assert "box AP" in stdout and "wrote" in stdout


def test_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    ctx = {"out": str(tmp_path)}
    deadline = __import__("time").perf_counter() + 120

    def broken(mode, device, ctx):
        return [sys.executable, "-c", "import sys; print('boom: no such kernel'); sys.exit(3)"], None, None

    def fine(mode, device, ctx):
        return [sys.executable, "-c", "print('[pretrain] fine')"], (lambda out: {"seen": "fine" in out}), None

    def silent(mode, device, ctx):  # exits 0 but prints none of the figures the parser expects
        return [sys.executable, "-c", "pass"], gpu_check.pretrain_stage("cpu", "cpu", ctx)[1], None

    rec = gpu_check.run_stage("seg", broken, "cpu", "cpu", ctx, deadline)
    assert rec["status"] == "failed" and "exit 3" in rec["error"] and "boom: no such kernel" in rec["error"]
    rec = gpu_check.run_stage("pretrain", silent, "cpu", "cpu", ctx, deadline)
    assert rec["status"] == "failed" and "expected figure" in rec["error"]
    rec = gpu_check.run_stage("det", fine, "cpu", "cpu", ctx, deadline)
    assert rec["status"] == "ok" and rec["figures"] == {"seen": True}


def test_stage_over_its_budget_is_killed_and_recorded(tmp_path):
    saved = gpu_check.MODES["cpu"]["seg"]["budget"]
    gpu_check.MODES["cpu"]["seg"]["budget"] = 2
    try:
        def slow(mode, device, ctx):
            return [sys.executable, "-c", "import time; time.sleep(60)"], None, None

        t0 = __import__("time").perf_counter()
        rec = gpu_check.run_stage("seg", slow, "cpu", "cpu", {"out": str(tmp_path)}, t0 + 120)
        assert rec["status"] == "timeout" and rec["seconds"] < 30
        rec = gpu_check.run_stage("seg", slow, "cpu", "cpu", {"out": str(tmp_path)}, t0 + 5)  # total budget spent
        assert rec["status"] == "skipped" and "out of time" in rec["error"]
    finally:
        gpu_check.MODES["cpu"]["seg"]["budget"] = saved


def test_pretrain_parser_reads_a_gpu_report_with_reference():
    """The figures of a GPU run as tools/benchmark.py prints them (format of its f-strings)."""
    out = "\n".join([
        "[pretrain] matmul 8192x8192 bf16: 700000.0 GFLOP/s",
        "[pretrain] bf16 datasheet peak: 989.4 TFLOP/s dense",
        "[pretrain] ours bf16: 2000.00 img/s; step median 0.1280 s (IQR 0.1270-0.1290, min 0.1260, max 0.1300, n=5)",
        "[pretrain] ours bf16: 40.00 GFLOP/img fwd+bwd; 80000.0 GFLOP/s = 11% of the bf16 matmul rate",
        "[pretrain] ours bf16: MFU 8.1% of the datasheet peak (model FLOPs of the step ...)",
        "[pretrain] ours bf16: peak memory 30000 MiB (torch.cuda.max_memory_allocated)",
        "[pretrain] reference bf16: 1600.00 img/s; step median 0.1600 s (IQR 0.1590-0.1610, min 0.1580, "
        "max 0.1620, n=5)",
        "[pretrain] reference bf16: 40.00 GFLOP/img fwd+bwd; 64000.0 GFLOP/s = 9% of the bf16 matmul rate",
        "[pretrain] reference bf16: MFU 6.5% of the datasheet peak (model FLOPs ...)",
        "[pretrain] ratio ours/reference bf16 (throughput): 1.25x",
    ])
    fig = gpu_check.pretrain_stage("gpu", "cuda", {"out": "/tmp"})[1](out)
    assert fig["ours_s_per_iter"] == 0.128 and fig["ours_mfu"] == pytest.approx(0.081)
    assert fig["reference_mfu"] == pytest.approx(0.065) and fig["ratio_ours_over_reference"] == 1.25
    assert fig["datasheet_peak_tflops"] == 989.4 and fig["ours_peak_memory_mib"] == 30000
    # the same run without mmpretrain: our side and MFU are still reported, the reference says why
    ours_only = "\n".join(ln for ln in out.splitlines() if "reference" not in ln and "ratio" not in ln)
    ours_only += "\n[pretrain] reference: UNAVAILABLE: mmpretrain not importable (ModuleNotFoundError: x)"
    fig = gpu_check.pretrain_stage("gpu", "cuda", {"out": "/tmp"})[1](ours_only)
    assert fig["reference"] == "reference unavailable: mmpretrain not importable (ModuleNotFoundError: x)"
    assert fig["ours_mfu"] == pytest.approx(0.081) and fig["ratio_ours_over_reference"] is None


def test_det_parser_reads_a_gpu_report():
    """bf16 lines carry the heads' precision in their tag, which the fp32 CPU mode never prints."""
    out = "\n".join([
        "[det] configs/COCO/mask_rcnn_itpn_base_1x.py: 110.00M parameters, batch 2",
        "[det] train 1024x1024 bf16 (heads bf16): 6.50 img/s; step median 0.3077 s (IQR 0.3-0.31, min 0.3, "
        "max 0.31, n=3)",
        "[det] train 1024x1024 bf16 (heads bf16): peak memory 21000 MiB (torch.cuda.max_memory_allocated)",
        "[det] train 1024x1024 bf16 (heads bf16): peak allocated 20500 MiB (profiler allocation events)",
        "[det] inference 1024x1024 bf16 (heads bf16): latency median 0.1000 s (IQR 0.1-0.1, min 0.1, max 0.1, n=3) "
        "for batch 2",
    ])
    cmd, parse, _ = gpu_check.det_stage("gpu", "cuda", {"out": "/tmp"}, act_ckpt=True)
    assert "--det-sizes" in cmd and cmd[cmd.index("--det-sizes") + 1] == "1024x1024"
    assert cmd[cmd.index("--det-batch") + 1] == "2" and "model.backbone.net.use_act_checkpoint=True" in cmd
    fig = parse(out)
    assert fig["train_s_per_iter"] == 0.3077 and fig["train_peak_memory_mib"] == 21000
    assert fig["train_peak_memory_how"] == "torch.cuda.max_memory_allocated"
    assert fig["inference_s_per_batch"] == 0.1 and fig["activation_checkpointing"] is True
    with pytest.raises(gpu_check.StageError, match="train peak memory"):
        parse(out.replace("peak memory 21000", "peak memory n/a"))


def test_gpu_stage_budgets_leave_room_within_the_total():
    # The last stage (finetune, the end-to-end CUDA proof) must get its whole budget even after the
    # machine queries: the stages' budgets (det twice: with and without checkpointing) stay under the total.
    # (The CPU mode's budgets are generous caps for slow machines; only its total is a promise.)
    m = gpu_check.MODES["gpu"]
    spent = sum(m[name.replace("_act_ckpt", "")]["budget"] for name in gpu_check.STAGES)
    assert spent <= m["budget"] - 15, (spent, m["budget"])
    assert m["budget"] < 8 * 60


def test_versions_without_git_say_unknown_not_clean(monkeypatch):
    # The check may run on a copy of the tree without .git: its JSON must not claim a clean tree.
    from itpn_d2.benchmark import machine_info

    monkeypatch.setattr(machine_info, "_cmd_out", lambda cmd, empty=None: None)
    v = machine_info.versions()
    assert v["git_commit"] is None and v["git_dirty"] is None
    monkeypatch.setattr(machine_info, "_cmd_out", lambda cmd, empty=None: "abc123" if "rev-parse" in cmd else empty)
    v = machine_info.versions()
    assert v["git_commit"] == "abc123" and v["git_dirty"] is False
    # `git status` failing (a broken index, say) is unknown too, not clean
    monkeypatch.setattr(machine_info, "_cmd_out", lambda cmd, empty=None: "abc123" if "rev-parse" in cmd else None)
    assert machine_info.versions()["git_dirty"] is None
