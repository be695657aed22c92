"""The GPU acceptance check (``tools/gpu_check.py``): every figure a first GPU run should give,
in one JSON.

Each stage is a subprocess with its own time budget (:data:`MODES`); a stage builder
(:func:`pretrain_stage`, :func:`det_stage`, :func:`seg_stage`, :func:`finetune_stage`) returns
``(command, parse, extra)``: ``parse`` turns the command's output into the stage's figures or
raises :class:`StageError`, ``extra`` is ``(before, env)`` or None. :func:`run_stage` runs one
and records it (ok / failed / timeout / skipped, a failure never stops the next stage);
:func:`run_gpu_check` runs the stages and writes the JSON after each.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from itpn_d2.utils.checkout import REPO_ROOT

from .machine_info import machine_info, versions
from .segmentation import RESULT_MARK, SEG_CONFIG

__all__ = [
    "PRETRAIN_CONFIG",
    "DET_CONFIG",
    "SEG_CONFIG",
    "FINETUNE_CONFIG",
    "MODES",
    "STAGES",
    "StageError",
    "run_logged",
    "pretrain_stage",
    "det_stage",
    "seg_stage",
    "finetune_stage",
    "run_stage",
    "summary_lines",
    "run_gpu_check",
]

PRETRAIN_CONFIG = "configs/pretrain/mim_itpn_base_mmpretrain_800ep.py"
DET_CONFIG = "configs/COCO/mask_rcnn_itpn_base_1x.py"
FINETUNE_CONFIG = "configs/COCO/mask_rcnn_itpn_tiny_demo.py"

# Sizes and budgets (seconds) per mode. The GPU stages' budgets (each subprocess's start-up,
# imports and model build inside) add up to 455 s, 15 s under the total of 470 (< 8 minutes),
# which also holds the machine and version queries before the first stage.
MODES = {
    "gpu": {
        "budget": 470,
        "pretrain": {"budget": 105, "batch": 256, "img": 224, "dtype": "bf16", "warmup": 2, "reps": 5},
        "det": {"budget": 65, "batch": 2, "size": "1024x1024", "dtype": "bf16", "warmup": 1, "reps": 3},
        "seg": {"budget": 55, "batch": 4, "size": 512, "dtype": "bf16", "warmup": 1, "reps": 3},
        "finetune": {"budget": 165, "iters": 300, "num_train": 200, "num_val": 50, "workers": 6},
    },
    "cpu": {
        "budget": 900,
        "pretrain": {"budget": 240, "batch": 2, "img": 64, "dtype": "fp32", "warmup": 0, "reps": 2,
                     "arch": "tiny"},
        # the demo detector (tiny HiViT, light heads): the base config's heads with a tiny
        # backbone take ~40 s a step on a busy 2-core machine
        "det": {"budget": 240, "batch": 1, "size": "128x128", "dtype": "fp32", "warmup": 0, "reps": 1,
                "config": FINETUNE_CONFIG},
        "seg": {"budget": 240, "batch": 2, "size": 64, "dtype": "fp32", "warmup": 0, "reps": 2, "arch": "tiny",
                "opts": ["model.sem_seg_head.channels=32", "model.sem_seg_head.aux_channels=16"]},
        "finetune": {"budget": 300, "iters": 4, "num_train": 8, "num_val": 4, "workers": 1},
    },
}
STAGES = ("pretrain", "det", "det_act_ckpt", "seg", "finetune")


def run_logged(cmd, log_path, timeout, env=None):
    """Run ``cmd`` from the repository root in its own process group, output to ``log_path``.
    Returns (returncode or None on timeout, output text). On timeout the whole group (the
    DataLoader workers of a training run included) is killed."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
    with open(log_path, errors="replace") as f:
        return rc, f.read()


def _tail(text, n=30):
    return "\n".join(text.rstrip().splitlines()[-n:])


class StageError(RuntimeError):
    pass


def _num(pattern, text, what, required=True, group=1):
    m = re.search(pattern, text, re.M)
    if m is None:
        if required:
            raise StageError(f"expected figure '{what}' not in the output (pattern {pattern!r})")
        return None
    return float(m.group(group))


def pretrain_stage(mode, device, ctx):
    c = MODES[mode]["pretrain"]
    cmd = [sys.executable, "tools/benchmark.py", "--what", "pretrain", "--config", PRETRAIN_CONFIG,
           "--device", device, "--batch", str(c["batch"]), "--img", str(c["img"]), "--dtypes", c["dtype"],
           "--warmup", str(c["warmup"]), "--reps", str(c["reps"])]
    if c.get("arch"):
        cmd += ["--arch", c["arch"]]
    if device == "cuda":
        cmd += ["--opts", "optimizer.fused=True"]  # the fused AdamW kernel, as the README benchmark

    def parse(out):
        d = c["dtype"]
        if re.search(rf"^\[pretrain\] {d}: SKIPPED", out, re.M):
            raise StageError(f"benchmark skipped {d} on this machine")
        fig = {"config": PRETRAIN_CONFIG, "arch": c.get("arch", "base (config)"), "dtype": d,
               "batch": c["batch"], "img": c["img"]}
        fig["ours_img_per_s"] = _num(rf"^\[pretrain\] ours {d}: ([\d.]+) img/s", out, "ours img/s")
        fig["ours_s_per_iter"] = _num(rf"^\[pretrain\] ours {d}: .*step median ([\d.]+) s", out, "ours s/iter")
        fig["ours_gflop_per_img"] = _num(rf"^\[pretrain\] ours {d}: ([\d.]+) GFLOP/img", out, "GFLOP/img")
        fig["ours_gflop_per_s"] = _num(rf"^\[pretrain\] ours {d}: .*; ([\d.]+) GFLOP/s =", out, "GFLOP/s")
        fig["matmul_gflop_per_s"] = _num(rf"^\[pretrain\] matmul \d+x\d+ {d}: ([\d.]+) GFLOP/s", out, "matmul")
        fig["ours_fraction_of_matmul_rate"] = _num(rf"^\[pretrain\] ours {d}: .*= (\d+)% of the", out,
                                                   "% of matmul rate") / 100
        fig["datasheet_peak_tflops"] = _num(rf"^\[pretrain\] {d} datasheet peak: ([\d.]+) TFLOP/s", out,
                                            "datasheet peak", required=False)
        mfu = _num(rf"^\[pretrain\] ours {d}: MFU ([\d.]+)%", out, "MFU", required=device == "cuda" and
                   fig["datasheet_peak_tflops"] is not None)
        fig["ours_mfu"] = None if mfu is None else mfu / 100
        if fig["ours_mfu"] is None:
            fig["ours_mfu_note"] = ("no datasheet peak on a CPU" if device != "cuda"
                                    else "card not in the datasheet table (tools/benchmark.py --peak-tflops)")
        fig["ours_peak_memory_mib"] = _num(rf"^\[pretrain\] ours {d}: peak memory (\d+) MiB", out, "peak memory")
        ref_img = _num(rf"^\[pretrain\] reference {d}: ([\d.]+) img/s", out, "reference", required=False)
        if ref_img is not None:
            fig["reference"] = "mmpretrain " + "itpn-pixel_hivit-base-p16_8xb512-amp-coslr-800e_in1k"
            fig["reference_img_per_s"] = ref_img
            fig["reference_s_per_iter"] = _num(rf"^\[pretrain\] reference {d}: .*step median ([\d.]+) s", out,
                                               "reference s/iter")
            fig["reference_gflop_per_s"] = _num(rf"^\[pretrain\] reference {d}: .*; ([\d.]+) GFLOP/s =", out,
                                                "reference GFLOP/s")
            rm = _num(rf"^\[pretrain\] reference {d}: MFU ([\d.]+)%", out, "reference MFU", required=False)
            fig["reference_mfu"] = None if rm is None else rm / 100
            fig["ratio_ours_over_reference"] = _num(rf"^\[pretrain\] ratio ours/reference {d} \(throughput\): "
                                                    r"([\d.]+)x", out, "ratio")
        else:
            m = re.search(r"^\[pretrain\] reference(?: \w+)?: (?:UNAVAILABLE: (.*)|(not run.*))$", out, re.M)
            why = (m.group(1) or m.group(2)) if m else "no reference line in the output"
            fig["reference"] = "reference unavailable: " + why
            fig["ratio_ours_over_reference"] = None
        return fig

    return cmd, parse, None


def det_stage(mode, device, ctx, act_ckpt):
    c = MODES[mode]["det"]
    config = c.get("config", DET_CONFIG)
    cmd = [sys.executable, "tools/benchmark.py", "--what", "det", "--det-config", config, "--device", device,
           "--det-batch", str(c["batch"]), "--det-sizes", c["size"], "--dtypes", c["dtype"],
           "--warmup", str(c["warmup"]), "--reps", str(c["reps"])]
    if c.get("arch"):
        cmd += ["--arch", c["arch"]]
    cmd += ["--opts", f"model.backbone.net.use_act_checkpoint={act_ckpt}"]

    def parse(out):
        d = c["dtype"]
        if re.search(rf"^\[det\] {d}: SKIPPED", out, re.M):
            raise StageError(f"benchmark skipped {d} on this machine")
        tag = re.escape(f"{c['size']} {d}") + r"(?: \(heads \w+\))?"
        fig = {"config": config, "arch": c.get("arch", "(config)"), "dtype": d, "batch": c["batch"],
               "size": c["size"], "activation_checkpointing": act_ckpt}
        fig["train_s_per_iter"] = _num(rf"^\[det\] train {tag}: .*step median ([\d.]+) s", out, "train s/iter")
        fig["train_img_per_s"] = _num(rf"^\[det\] train {tag}: ([\d.]+) img/s", out, "train img/s")
        fig["train_peak_memory_mib"] = _num(rf"^\[det\] train {tag}: peak memory (\d+) MiB", out,
                                            "train peak memory")
        m = re.search(rf"^\[det\] train {tag}: peak memory \d+ MiB \((.*)\)$", out, re.M)
        fig["train_peak_memory_how"] = m.group(1) if m else None
        fig["train_peak_allocated_mib"] = _num(rf"^\[det\] train {tag}: peak allocated (\d+) MiB", out,
                                               "train peak allocated")
        fig["inference_s_per_batch"] = _num(rf"^\[det\] inference {tag}: latency median ([\d.]+) s", out,
                                            "inference latency")
        return fig

    return cmd, parse, None


def seg_stage(mode, device, ctx):
    c = MODES[mode]["seg"]
    cmd = [sys.executable, os.path.join("tools", "gpu_check.py"), "--seg-worker", "--device", device,
           "--seg-size", str(c["size"]), "--seg-batch", str(c["batch"]), "--seg-dtype", c["dtype"],
           "--seg-warmup", str(c["warmup"]), "--seg-reps", str(c["reps"])]
    if c.get("arch"):
        cmd += ["--seg-arch", c["arch"]]
    if c.get("opts"):
        cmd += ["--opts", *c["opts"]]

    def parse(out):
        lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_MARK)]
        if not lines:
            raise StageError("the segmentation worker printed no result line")
        return json.loads(lines[-1][len(RESULT_MARK):])

    return cmd, parse, None


def finetune_stage(mode, device, ctx):
    """Generate the built-in data into the output folder, then fine-tune + evaluate."""
    c = MODES[mode]["finetune"]
    data_root = os.path.join(ctx["out"], "synthetic_data")
    ft_dir = os.path.join(ctx["out"], "finetune")
    n = c["iters"]
    gen = [sys.executable, "datasets/generate_synthetic.py", "--root", data_root, "--num-train",
           str(c["num_train"]), "--num-val", str(c["num_val"]), "--num-unlabeled", "0"]
    cmd = [sys.executable, "tools/lazyconfig_train_net.py", "--num-gpus", "1", "--config-file", FINETUNE_CONFIG,
           f"train.output_dir={ft_dir}", f"train.device={device}", f"train.max_iter={n}", f"train.eval_period={n}",
           f"train.checkpointer.period={n}", f"train.log_period={min(20, n)}",
           f"dataloader.train.num_workers={c['workers']}", f"dataloader.test.num_workers={c['workers']}",
           # a short run scores many objects under the usual 0.05; keeping them makes COCO AP
           # (which ranks by score) defined whatever the run's length
           "model.roi_heads.box_predictor.test_score_thresh=0.0"]
    if device == "cuda":
        cmd += ["train.amp.enabled=True", "train.amp.dtype=bfloat16"]
    env = dict(os.environ, ITPN_SYNTHETIC_ROOT=data_root)

    def before(log_path, timeout):
        rc, out = run_logged(gen, log_path.replace(".log", "_data.log"), timeout, env=env)
        if rc != 0:
            raise StageError(f"data generation {'timed out' if rc is None else f'exited {rc}'}:\n{_tail(out)}")

    def parse(out):
        from itpn_d2.utils.metrics_json import read_metrics

        path = os.path.join(ft_dir, "metrics.json")
        rows = read_metrics(ft_dir)
        merged = {}
        for r in rows:
            merged.update(r)
        if "bbox/AP" not in merged:
            raise StageError(f"no bbox/AP in {path}")
        times = sorted(r["time"] for r in rows if "time" in r)
        fig = {"config": FINETUNE_CONFIG, "device": device, "amp": "bfloat16" if device == "cuda" else "off",
               "iterations": n, "train_images": c["num_train"], "val_images": c["num_val"],
               "box_AP": merged["bbox/AP"], "box_AP50": merged.get("bbox/AP50"),
               "mask_AP": merged.get("segm/AP"), "mask_AP50": merged.get("segm/AP50"),
               "s_per_iter_median": times[len(times) // 2] if times else None,
               "final_total_loss": merged.get("total_loss"), "metrics": path}
        if fig["box_AP"] is None or fig["box_AP"] != fig["box_AP"]:
            raise StageError(f"bbox/AP is not a number in {path}: {fig['box_AP']!r}")
        return fig

    return cmd, parse, (before, env)


def run_stage(name, build, mode, device, ctx, deadline):
    rec = {"status": None, "seconds": None}
    left = deadline - time.perf_counter()
    budget = MODES[mode][name.replace("_act_ckpt", "")]["budget"]
    if left < 15:
        rec.update(status="skipped", error=f"out of time: {left:.0f}s of the total budget left")
        return rec
    timeout = min(budget, left)
    t0 = time.perf_counter()
    log_path = os.path.join(ctx["out"], f"{name}.log")
    rec["log"] = log_path
    rec["budget_s"] = round(timeout)
    try:
        cmd, parse, extra = build(mode, device, ctx)
        rec["command"] = " ".join(shlex.quote(c) for c in cmd)
        env = None
        if extra is not None:
            before, env = extra
            before(log_path, timeout)
        rc, out = run_logged(cmd, log_path, timeout - (time.perf_counter() - t0), env=env)
        if rc is None:
            rec.update(status="timeout", error=f"over its {timeout:.0f}s budget; output tail:\n{_tail(out)}")
        elif rc != 0:
            rec.update(status="failed", error=f"exit {rc}; output tail:\n{_tail(out)}")
        else:
            rec["figures"] = parse(out)
            rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, the next stage still runs
        rec.update(status="failed", error=f"{type(e).__name__}: {e}")
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def summary_lines(report):
    yield f"machine: {report['machine']['gpu'] or report['machine']['cpu']}; mode {report['mode']}; " \
          f"torch {report['versions']['torch']}; commit {report['versions']['git_commit']}"
    for name, rec in report["stages"].items():
        f = rec.get("figures") or {}
        if rec["status"] != "ok":
            first = (rec.get("error") or "").splitlines()[:1]
            yield f"  {name:13s} {rec['status'].upper()} ({rec['seconds']}s): {first[0] if first else ''}"
            continue
        if name == "pretrain":
            ratio = f["ratio_ours_over_reference"]
            mfu = f["ours_mfu"]
            yield (f"  {name:13s} ours {f['ours_img_per_s']:.1f} img/s ({f['ours_s_per_iter']:.4f} s/iter), "
                   f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, ratio ours/reference "
                   f"{'n/a' if ratio is None else f'{ratio:.2f}x'}; {f['reference'] if ratio is None else ''}")
        elif name.startswith("det"):
            yield (f"  {name:13s} {f['train_s_per_iter']:.4f} s/iter, peak {f['train_peak_memory_mib']:.0f} MiB "
                   f"({f['train_peak_memory_how'].split(';')[0]})")
        elif name == "seg":
            yield (f"  {name:13s} {f['train_s_per_iter']:.4f} s/iter, peak {f['train_peak_memory_mib']} MiB "
                   f"({f['train_peak_memory_how'].split(';')[0]})")
        elif name == "finetune":
            yield (f"  {name:13s} box AP {f['box_AP']:.1f} (mask AP {f['mask_AP']}) after {f['iterations']} "
                   f"iterations on {f['device']}")
        yield f"  {'':13s} ({rec['seconds']}s)"
    yield f"total {report['total_seconds']}s"


def run_gpu_check(*, cpu: bool = False, out: str = "output/gpu_check", json_path=None, stages=STAGES,
                  budget=None) -> dict:
    """Run ``stages`` (names of :data:`STAGES`) in the GPU mode, or the tiny CPU mode when ``cpu``
    or without CUDA, within ``budget`` seconds (default the mode's); write the JSON to
    ``json_path`` (default ``out/gpu_check.json``) after every stage and print a summary.

    Returns the report: ``mode``, ``device``, ``machine``, ``versions``, ``sizes``, ``stages``
    (per stage: status, seconds, command, figures, error, log) and ``total_seconds``.
    Raises ``ValueError`` for an unknown stage.
    """
    import torch

    t_start = time.perf_counter()
    mode = "cpu" if cpu or not torch.cuda.is_available() else "gpu"
    device = "cuda" if mode == "gpu" else "cpu"
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    json_path = os.path.abspath(json_path or os.path.join(out, "gpu_check.json"))
    deadline = t_start + (budget or MODES[mode]["budget"])
    ctx = {"out": out}
    builders = {
        "pretrain": pretrain_stage,
        "det": lambda m, d, c: det_stage(m, d, c, act_ckpt=False),
        "det_act_ckpt": lambda m, d, c: det_stage(m, d, c, act_ckpt=True),
        "seg": seg_stage,
        "finetune": finetune_stage,
    }
    report = {"mode": mode, "device": device, "machine": machine_info(), "versions": versions(),
              "sizes": {k: v for k, v in MODES[mode].items() if k != "budget"}, "stages": {}}
    print(f"[gpu_check] mode {mode}; output {out}", flush=True)
    for name in stages:
        print(f"[gpu_check] {name} ...", flush=True)
        rec = run_stage(name, builders[name], mode, device, ctx, deadline)
        report["stages"][name] = rec
        print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']}s)"
              + (f": {rec['error'].splitlines()[0]}" if rec.get("error") else ""), flush=True)
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        with open(json_path, "w") as f:  # after every stage: a killed run keeps what it measured
            json.dump(report, f, indent=2)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    print("\n".join(summary_lines(report)))
    print(f"[gpu_check] wrote {json_path}")
    return report
