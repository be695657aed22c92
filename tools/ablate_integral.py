#!/usr/bin/env python
"""What do the pyramid in pre-training and MFM each add? Tiny iTPN fine-tuned from

  1. scratch            nothing pre-trained
  2. backbone_only      the paper's baseline: the encoder pre-trained with MIM and NO pyramid
                        (decoder on the stride-16 output), fine-tuned with a fresh pyramid
  3. encoder_only       encoder of the integral MIM pre-training, pyramid re-initialised
  4. integral_mim       encoder AND pyramid pre-trained with MIM (iTPN)
  5. integral_mim_mfm   encoder and pyramid pre-trained with MIM + MFM (EMA-encoder targets)

for each task (``det``: Mask R-CNN box and mask AP on the built-in data; ``seg``: a
segmentation config given with ``--seg-config``, mIoU), several seeds, and two pre-training
budgets:

  iters   every pre-training runs the same iterations (``--pretrain-iters``);
  flops   every pre-training gets the FLOPs of the most expensive one (MIM + MFM) at those
          iterations: iterations x (its FLOPs per iteration) / (theirs), FLOPs per iteration
          counted as tools/analyze_model.py counts them (``itpn_d2.utils.flops``: 2 FLOPs per
          multiply-add): batch x (3 x student forward + teacher forward), backward taken as
          twice the forward.

Reported (``results.md``, ``results.json``): per variant mean and sd of each metric; for each
claim the per-seed paired differences (fine-tuning seed s of one variant against seed s of the
other) with a 95% t-interval and an exact two-sided sign test, for the final metric and for the
metric at the first evaluation (convergence speed); the pre-training MIM loss with and without
the pyramid over iterations and over FLOPs (the paper's reconstruction claim), paired per
pre-training seed; ``curves_<task>.png`` and ``mim_loss.png``.

Every run writes into its own folder under ``--output-dir`` and a finished one (its
``model_final.pth`` exists) is reused, an interrupted one resumes (``--resume``), so the
experiment can be spread over several sessions; ``--report-only`` re-reads finished runs.

    python tools/ablate_integral.py --output-dir output/ablation --seeds 0 1 2 3 4 --jobs 2 \
        --tasks det seg --seg-config configs/ADE20K/uper_itpn_tiny_demo.py
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from itpn_d2.utils.flops import FLOP_CONVENTION  # noqa: E402
from itpn_d2.utils.metrics_json import read_metrics  # noqa: E402
PRETRAIN_CFG = "configs/pretrain/mim_mfm_itpn_tiny_cpu.py"
BACKBONE_ONLY_CFG = "configs/pretrain/mim_backbone_only_itpn_tiny_cpu.py"
FINETUNE_CFG = "configs/COCO/mask_rcnn_itpn_tiny_demo.py"

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


class Task:
    """A fine-tuning task: its config and the metrics.json keys it reports.

    ``metrics`` maps a short name to a metrics.json key; a missing or NaN value (e.g. COCO
    AP of a detector with no detection yet) counts as 0, as COCO's evaluation would score it.
    """

    def __init__(self, name: str, config: str, metrics: Dict[str, str], extra: Sequence[str] = ()):
        self.name, self.config, self.metrics, self.extra = name, config, dict(metrics), list(extra)

    def check(self, flag: str) -> None:
        path = self.config if os.path.isabs(self.config) else os.path.join(ROOT, self.config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"task {self.name!r}: config {self.config} not found (set {flag})")


def make_tasks(names: Sequence[str], det_config: str = FINETUNE_CFG, seg_config: Optional[str] = None,
               seg_metric: str = "sem_seg/mIoU") -> Dict[str, Task]:
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


THREADS = None  # torch threads per run when several run at once (--jobs)


def run(cmd, log_path):
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if THREADS:
        env.setdefault("OMP_NUM_THREADS", str(THREADS))
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log_path) as f:
            sys.stderr.write("".join(f.readlines()[-30:]))
        raise RuntimeError(f"command failed (exit {rc}); log: {log_path}")


def _finite(v) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


# ---------------------------------------------------------------------------- FLOPs


def pretrain_flops(kind: str, overrides: Sequence[str] = ()) -> Dict[str, float]:
    """FLOPs of one pre-training iteration of ``kind`` (``itpn_d2.utils.flops``: 2 per multiply-add).

    Returns {"student_fwd", "teacher_fwd"} per image, "batch", and "per_iter" =
    batch x (3 x student_fwd + teacher_fwd): the student's backward is taken as twice its
    forward (the usual estimate), the teacher runs forward only; losses and the EMA update
    (elementwise) are left out.
    """
    import torch
    from detectron2.config import instantiate

    from itpn_d2.config import load_config
    from itpn_d2.utils.flops import forward_flops

    cfg_path, kind_overrides = PRETRAININGS[kind]
    cfg = load_config(os.path.join(ROOT, cfg_path), [*kind_overrides, *overrides])
    model = instantiate(cfg.model).eval()
    size = int(cfg.dataloader.train.mapper.image_size)
    grid = (size // model.unit_size, size // model.unit_size)
    images = torch.zeros(1, 3, size, size)
    ids_keep, _ = model.make_mask(1, grid, generator=torch.Generator().manual_seed(0))

    class Student(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, ids):
            out = self.m.predict(x, ids)
            preds = []
            for part in (out["mim"], out["mfm"]):
                if part is not None:
                    preds += list(part) if isinstance(part, (list, tuple)) else [part]
            return tuple(preds)

    student = forward_flops(Student(model), images, ids_keep)
    teacher = forward_flops(model.teacher, images) if model.teacher is not None else 0
    batch = int(cfg.dataloader.train.total_batch_size)
    return {"student_fwd": float(student), "teacher_fwd": float(teacher), "batch": batch,
            "per_iter": float(batch * (3 * student + teacher)), "convention": FLOP_CONVENTION}


def budget_iters(flops: Dict[str, Dict[str, float]], iters: int) -> Dict[str, int]:
    """Equal compute: each kind's iterations so that its FLOPs match the most expensive kind's at ``iters``."""
    ref = max(f["per_iter"] for f in flops.values())
    return {k: int(round(iters * ref / f["per_iter"])) for k, f in flops.items()}


# ---------------------------------------------------------------------------- runs


def pretrain(kind: str, out: str, iters: Optional[int], seed: int = 0) -> str:
    """Run (or reuse, or resume) one pre-training; returns its final checkpoint."""
    ckpt = os.path.join(out, "model_final.pth")
    if os.path.exists(ckpt):
        print(f"[ablation] reusing {ckpt}")
        return ckpt
    cfg, overrides = PRETRAININGS[kind]
    cmd = [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", cfg, "--resume",
           f"train.output_dir={out}", f"train.seed={seed}", *overrides]
    if iters:
        cmd += [f"train.max_iter={iters}"]
    os.makedirs(out, exist_ok=True)
    run(cmd, os.path.join(out, "run.log"))
    return ckpt


def mim_curve(out: str) -> List[List[float]]:
    """[(iteration, MIM loss)] of a pre-training run. A run whose only loss is MIM logs it
    as ``total_loss`` (detectron2 logs a single term under that name alone)."""
    curve = []
    for r in read_metrics(out):
        if "loss_mim" in r:
            curve.append([r["iteration"], r["loss_mim"]])
        elif "total_loss" in r and not any(k.startswith("loss_") for k in r):
            curve.append([r["iteration"], r["total_loss"]])
    return curve


def finetune(task: Task, variant: str, ckpt: Optional[str], load_mode: str, seed: int, iters: int, evals: int,
             out: str, budget: str = "iters") -> dict:
    """Run (or reuse, or resume) one fine-tuning; returns its record:
    {"task", "variant", "budget", "seed", "loss": [(iter, total_loss)],
     "evals": [(iters trained, {metric: value})], "final": {metric: value}}."""
    if not os.path.exists(os.path.join(out, "model_final.pth")):
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", task.config, "--resume",
               f"train.output_dir={out}", f"train.seed={seed}", f"train.max_iter={iters}",
               f"train.eval_period={max(iters // evals, 1)}", f"train.checkpointer.period={iters}",
               "train.log_period=10", f"train.backbone_load={load_mode}",
               f"train.init_checkpoint={ckpt or ''}", *task.extra]
        run(cmd, os.path.join(out, "run.log"))
    rows = read_metrics(out)
    loss = [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r]
    keys = list(task.metrics.values())
    # the final evaluation is logged one past max_iter - 1
    evs = [(min(r["iteration"] + 1, iters), {m: _finite(r.get(k)) for m, k in task.metrics.items()})
           for r in rows if any(k in r for k in keys)]
    if not evs:
        raise RuntimeError(f"{out}/metrics.json has no {keys}: did the run evaluate?")
    return {"task": task.name, "variant": variant, "budget": budget, "seed": seed, "loss": loss,
            "evals": evs, "final": evs[-1][1]}


# ---------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    # continued fraction of the regularised incomplete beta function (Lentz's method)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        even = m * (b - m) * x / ((a + m2 - 1) * (a + m2))
        odd = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))
        for num in (even, odd):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1.0 - x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: int) -> float:
    """Quantile of Student's t (bisection on :func:`t_cdf`), 0.5 < q < 1."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def sign_test_p(pos: int, neg: int) -> float:
    """Exact two-sided sign test (ties dropped): P(a split at least this uneven | p = 1/2)."""
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)


def paired(a: Dict[int, float], b: Dict[int, float]) -> dict:
    """Paired differences a[s] - b[s] over the seeds both have: mean, sd, 95% t-interval,
    and the exact sign test (its smallest two-sided p with n pairs is 2 / 2^n: 0.0625 at n = 5)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    res = {"seeds": seeds, "diffs": d, "n": n, "mean": statistics.mean(d) if d else float("nan")}
    if n >= 2:
        sd = statistics.stdev(d)
        half = t_ppf(0.975, n - 1) * sd / math.sqrt(n)
        res.update(sd=sd, ci95=[res["mean"] - half, res["mean"] + half])
    else:
        res.update(sd=float("nan"), ci95=None)
    pos, neg = sum(x > 0 for x in d), sum(x < 0 for x in d)
    res.update(sign={"pos": pos, "neg": neg, "ties": n - pos - neg, "p": sign_test_p(pos, neg)})
    return res


def verdict(p: dict) -> str:
    if p["ci95"] is None:
        return "n/a (fewer than 2 pairs)"
    lo, hi = p["ci95"]
    if lo > 0:
        return "established: higher"
    if hi < 0:
        return "established: lower"
    return "not established"


# ---------------------------------------------------------------------------- reporting


def _sel(runs, **kw):
    return [r for r in runs if all(r.get(k) == v for k, v in kw.items())]


def _budget_of(variant: str, budget: str) -> str:
    return "iters" if VARIANTS[variant][0] is None else budget  # scratch does not pre-train


def _mean_sd(x: Sequence[float]) -> List[float]:
    return [statistics.mean(x), statistics.stdev(x) if len(x) > 1 else 0.0]


def summarise(runs: List[dict], tasks: Dict[str, Task], variants: Sequence[str], budgets: Sequence[str]) -> List[dict]:
    """One row per (task, budget, variant): seeds, mean and sd of each final metric and of the
    metric at the first evaluation, and the mean curve over the evaluations."""
    table = []
    for tname, task in tasks.items():
        for budget in budgets:
            for v in variants:
                rs = _sel(runs, task=tname, variant=v, budget=_budget_of(v, budget))
                if not rs:
                    continue
                row = {"task": tname, "budget": budget, "variant": v, "seeds": len(rs),
                       "eval_iters": [i for i, _ in rs[0]["evals"]]}
                for m in task.metrics:
                    final = [r["final"][m] for r in rs]
                    first = [r["evals"][0][1][m] for r in rs]
                    row[m] = _mean_sd(final)
                    row[f"{m}_first_eval"] = _mean_sd(first)
                    n_ev = min(len(r["evals"]) for r in rs)
                    row[f"{m}_curve"] = [statistics.mean(r["evals"][k][1][m] for r in rs) for k in range(n_ev)]
                table.append(row)
    return table


def claims(runs: List[dict], tasks: Dict[str, Task], variants: Sequence[str], budgets: Sequence[str]) -> List[dict]:
    """Paired per-seed differences for every claim whose two variants were run, per task,
    budget and metric, at the final evaluation ("final") and at the first ("first_eval")."""
    out = []
    for tname, task in tasks.items():
        for budget in budgets:
            for label, a, b in CLAIMS:
                if a not in variants or b not in variants:
                    continue
                ra = {r["seed"]: r for r in _sel(runs, task=tname, variant=a, budget=_budget_of(a, budget))}
                rb = {r["seed"]: r for r in _sel(runs, task=tname, variant=b, budget=_budget_of(b, budget))}
                if not ra or not rb:
                    continue
                for m in task.metrics:
                    for when in ("final", "first_eval"):
                        def val(r):
                            return r["final"][m] if when == "final" else r["evals"][0][1][m]
                        p = paired({s: val(r) for s, r in ra.items()}, {s: val(r) for s, r in rb.items()})
                        out.append({"task": tname, "budget": budget, "claim": label, "a": a, "b": b, "metric": m,
                                    "when": when, **p, "verdict": verdict(p)})
    return out


def mim_claim(curves: Dict[str, Dict[int, List[List[float]]]], last: int = 3) -> Optional[dict]:
    """The reconstruction claim: final MIM loss (mean of the last ``last`` logged values) with the
    pyramid (``mim``) minus without (``backbone_only``), paired per pre-training seed."""
    if "mim" not in curves or "backbone_only" not in curves:
        return None

    def final(c):
        return statistics.mean(v for _, v in c[-last:])

    a = {s: final(c) for s, c in curves["mim"].items() if c}
    b = {s: final(c) for s, c in curves["backbone_only"].items() if c}
    p = paired(a, b)
    return {"claim": "pre-training MIM loss, with pyramid minus without", **p, "verdict": verdict(p)}


def _fmt_ci(p: dict) -> str:
    return "n/a" if p["ci95"] is None else f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"


def write_report(table, claim_rows, flops, mim, path) -> str:
    lines = []
    if flops:
        lines += [f"FLOPs per pre-training iteration ({FLOP_CONVENTION}; batch x (3 x student forward + "
                  "teacher forward)):", "",
                  "| pre-training | student fwd / image (GFLOPs) | teacher fwd / image (GFLOPs) | batch | "
                  "per iteration (GFLOPs) | iterations (iters / flops budget) |", "|---|---|---|---|---|---|"]
        for k, f in flops.items():
            its = f.get("iterations", {})
            lines.append(f"| {k} | {f['student_fwd'] / 1e9:.3f} | {f['teacher_fwd'] / 1e9:.3f} | {f['batch']} | "
                         f"{f['per_iter'] / 1e9:.2f} | {its.get('iters', '?')} / {its.get('flops', '?')} |")
        lines.append("")
    for (task, budget) in dict.fromkeys((t["task"], t["budget"]) for t in table):
        rows = [t for t in table if t["task"] == task and t["budget"] == budget]
        metrics = [k for k in rows[0] if k + "_curve" in rows[0]]
        its = " / ".join(str(i) for i in rows[0]["eval_iters"])
        lines += [f"Task {task}, pre-training budget: equal {budget}", "",
                  "| variant | seeds | " + " | ".join(f"{m} (mean ± sd)" for m in metrics)
                  + " | " + " | ".join(f"{m} at iter {its}" for m in metrics) + " |",
                  "|---|---|" + "---|" * (2 * len(metrics))]
        for t in rows:
            lines.append(f"| {t['variant']} | {t['seeds']} | "
                         + " | ".join(f"{t[m][0]:.1f} ± {t[m][1]:.1f}" for m in metrics) + " | "
                         + " | ".join(" / ".join(f"{a:.1f}" for a in t[m + '_curve']) for m in metrics) + " |")
        lines.append("")
    if claim_rows:
        lines += ["Paired per-seed differences (a - b): mean, 95% t-interval, exact sign test", "",
                  "| task | budget | claim | metric | at | n | mean | 95% CI | + / - / = | sign p | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in claim_rows:
            s = c["sign"]
            lines.append(f"| {c['task']} | {c['budget']} | {c['claim']} ({c['a']} - {c['b']}) | {c['metric']} | "
                         f"{c['when']} | {c['n']} | {c['mean']:+.2f} | {_fmt_ci(c)} | {s['pos']} / {s['neg']} / "
                         f"{s['ties']} | {s['p']:.3f} | {c['verdict']} |")
        lines.append("")
    if mim:
        s = mim["sign"]
        lines += [f"{mim['claim']}: n {mim['n']}, mean {mim['mean']:+.4f}, 95% CI {_fmt_ci(mim)}, "
                  f"sign + / - {s['pos']} / {s['neg']} (p {s['p']:.3f}): {mim['verdict']}", ""]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text + "\n")
    return text


def plot(runs, table, tasks: Dict[str, Task], variants, budgets, out_dir) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for tname, task in tasks.items():
        metrics = list(task.metrics)
        fig, axes = plt.subplots(len(budgets), 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 3.6 * len(budgets)),
                                 squeeze=False)
        for bi, budget in enumerate(budgets):
            for v in variants:
                rs = _sel(runs, task=tname, variant=v, budget=_budget_of(v, budget))
                if not rs:
                    continue
                n = min(len(r["loss"]) for r in rs)
                its = [i for i, _ in rs[0]["loss"][:n]]
                axes[bi][0].plot(its, [statistics.mean(r["loss"][k][1] for r in rs) for k in range(n)], label=v)
                row = [t for t in table if t["task"] == tname and t["budget"] == budget and t["variant"] == v][0]
                for mi, m in enumerate(metrics):
                    ev = row["eval_iters"][: len(row[m + "_curve"])]
                    axes[bi][1 + mi].plot(ev, row[m + "_curve"], marker="o", label=v)
            axes[bi][0].set(xlabel="fine-tuning iteration", ylabel="total loss (mean over seeds)",
                            title=f"{tname}, equal {budget}: loss")
            for mi, m in enumerate(metrics):
                axes[bi][1 + mi].set(xlabel="fine-tuning iteration", ylabel=f"{m} (mean over seeds)",
                                     title=f"{tname}, equal {budget}: {m}")
            for ax in axes[bi]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"curves_{tname}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_mim(curves: Dict[str, Dict[int, List[List[float]]]], flops: Dict[str, dict], path: str) -> None:
    """Pre-training MIM loss with and without the pyramid, over iterations and over FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_it, ax_fl) = plt.subplots(1, 2, figsize=(11, 4))
    names = {"backbone_only": "no pyramid (backbone only)", "mim": "pyramid (integral MIM)",
             "mim_mfm": "pyramid + MFM"}
    for kind, by_seed in curves.items():
        for seed, c in sorted(by_seed.items()):
            if not c:
                continue
            its = [i for i, _ in c]
            label = f"{names.get(kind, kind)}, seed {seed}"
            ax_it.plot(its, [v for _, v in c], label=label)
            if kind in flops:
                ax_fl.plot([(i + 1) * flops[kind]["per_iter"] / 1e12 for i in its], [v for _, v in c], label=label)
    ax_it.set(xlabel="pre-training iteration", ylabel="MIM loss (masked units)",
              title="reconstruction, equal iterations")
    ax_fl.set(xlabel="pre-training TFLOPs", ylabel="MIM loss (masked units)", title="reconstruction, equal compute")
    ax_it.legend(fontsize=7)
    ax_fl.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="output/ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="fine-tuning seeds")
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0],
                   help="pre-training seeds; fine-tuning seed number i uses pre-training seed i mod their count")
    p.add_argument("--pretrain-iters", type=int, default=500, help="the equal-iterations budget (the demo's 500)")
    p.add_argument("--finetune-iters", type=int, default=450, help="default: the demo's schedule")
    p.add_argument("--evals", type=int, default=3, help="evaluations during each fine-tuning run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--tasks", nargs="+", default=["det"], choices=["det", "seg"])
    p.add_argument("--det-config", default=FINETUNE_CFG)
    p.add_argument("--seg-config", default=None, help="segmentation fine-tuning config (task seg)")
    p.add_argument("--seg-metric", default="sem_seg/mIoU", help="metrics.json key of the segmentation metric")
    p.add_argument("--pretrain-mim-mfm", default=None,
                   help="reuse this MIM + MFM checkpoint as the equal-iterations one of the first pre-training "
                        "seed (e.g. make demo's, same config and 500 iterations); its metrics.json beside it is "
                        "used for the MIM-loss curve")
    p.add_argument("--report-only", action="store_true", help="no new runs: report the finished ones")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with cores/jobs torch threads (a detectron2 step is "
                        "largely single-threaded, so 2 jobs on 2 cores finish sooner than 1)")
    args = p.parse_args(argv)
    try:
        tasks = make_tasks(args.tasks, args.det_config, args.seg_config, args.seg_metric)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"[ablation] {e}")
    global THREADS
    if args.jobs > 1:
        THREADS = max(1, (os.cpu_count() or 1) // args.jobs)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()

    kinds = sorted({VARIANTS[v][0] for v in args.variants} - {None})
    flops_path = os.path.join(out, "flops.json")
    flops = {}
    if os.path.exists(flops_path):
        with open(flops_path) as f:
            # counts of another convention (fvcore's, one per multiply-add, before) are redone
            flops = {k: v for k, v in json.load(f).items() if v.get("convention") == FLOP_CONVENTION}
    for k in kinds:
        if k not in flops:
            flops[k] = pretrain_flops(k)
    iters = {"iters": {k: args.pretrain_iters for k in kinds},
             "flops": budget_iters({k: flops[k] for k in kinds}, args.pretrain_iters)}
    for k in kinds:
        flops[k]["iterations"] = {b: iters[b][k] for b in BUDGETS}
    with open(flops_path, "w") as f:
        json.dump(flops, f, indent=1)

    def pre_dir(kind, budget, seed):
        return os.path.join(out, f"pretrain_{kind}_{iters[budget][kind]}it_s{seed}")

    if args.pretrain_mim_mfm and "mim_mfm" in kinds:
        given = os.path.abspath(args.pretrain_mim_mfm)
        if not os.path.isfile(given):
            sys.exit(f"[ablation] --pretrain-mim-mfm {args.pretrain_mim_mfm}: no such file")
        d = pre_dir("mim_mfm", "iters", args.pretrain_seeds[0])
        os.makedirs(d, exist_ok=True)
        beside = os.path.join(os.path.dirname(given), "metrics.json")
        for name, src in (("model_final.pth", given), ("metrics.json", beside)):
            dst = os.path.join(d, name)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)

    pre_jobs = sorted({(k, b, s) for k in kinds for b in args.budgets for s in args.pretrain_seeds},
                      key=lambda j: (iters[j[1]][j[0]], j))
    pre_jobs = list(dict.fromkeys((k, pre_dir(k, b, s), iters[b][k], s) for k, b, s in pre_jobs))
    if not args.report_only:
        try:
            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                list(pool.map(lambda j: pretrain(j[0], j[1], j[2], j[3]), pre_jobs))
        except RuntimeError as e:
            sys.exit(f"[ablation] {e}")

    def ft_job(task, v, budget, i, seed):
        kind, load_mode = VARIANTS[v]
        b = _budget_of(v, budget)
        ckpt = None
        if kind is not None:
            ckpt = os.path.join(pre_dir(kind, b, args.pretrain_seeds[i % len(args.pretrain_seeds)]), "model_final.pth")
        tag = v if b == "iters" else f"{v}@flops"
        return (task, v, b, seed, ckpt, load_mode, os.path.join(out, f"ft_{task.name}_{tag}_s{seed}"))

    jobs = list(dict.fromkeys(ft_job(t, v, b, i, s) for t in tasks.values() for b in args.budgets
                              for i, s in enumerate(args.seeds) for v in args.variants))

    def one(job):
        task, v, b, seed, ckpt, load_mode, d = job
        if args.report_only and not os.path.exists(os.path.join(d, "model_final.pth")):
            return None
        print(f"[ablation] {task.name}: fine-tuning {v} (pre-training budget {b}), seed {seed}", flush=True)
        return finetune(task, v, ckpt, load_mode, seed, args.finetune_iters, args.evals, d, budget=b)

    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = [r for r in pool.map(one, jobs) if r is not None]
    except RuntimeError as e:
        sys.exit(f"[ablation] {e}")

    curves = {}  # the equal-iterations pre-trainings: MIM loss with and without the pyramid
    for k in kinds:
        for s in args.pretrain_seeds:
            d = pre_dir(k, "iters", s)
            if os.path.exists(os.path.join(d, "metrics.json")):
                curves.setdefault(k, {})[s] = mim_curve(d)
    table = summarise(runs, tasks, args.variants, args.budgets)
    claim_rows = claims(runs, tasks, args.variants, args.budgets)
    mim = mim_claim(curves)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "flops": flops, "runs": runs, "table": table, "claims": claim_rows,
                   "mim_curves": curves, "mim_claim": mim}, f, indent=1)
    md = write_report(table, claim_rows, flops, mim, os.path.join(out, "results.md"))
    if runs:
        plot(runs, table, tasks, args.variants, args.budgets, out)
    if curves:
        plot_mim(curves, flops, os.path.join(out, "mim_loss.png"))
    print(md)
    print(f"[ablation] {len(runs)} fine-tuning runs in {(time.perf_counter() - t0) / 60:.1f} min; "
          f"wrote {out}/results.md, results.json and the plots")


if __name__ == "__main__":
    main()
