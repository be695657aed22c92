#!/usr/bin/env python
"""Does integral pre-training pay? Mask R-CNN fine-tuned on the built-in data from

  1. scratch            nothing pre-trained
  2. encoder_only       MIM-pre-trained encoder, pyramid re-initialised (how others transfer)
  3. integral_mim       MIM-pre-trained encoder AND pyramid (iTPN)
  4. integral_mim_mfm   encoder and pyramid pre-trained with MIM + MFM (EMA teacher)

Equal budget: both pre-trainings run the same number of iterations at the same batch
(``configs/pretrain/mim_mfm_itpn_tiny_cpu.py``, MFM switched off for MIM-only), and every
fine-tuning run the same iterations, batch and schedule (``configs/COCO/mask_rcnn_itpn_tiny_demo.py``).
Each variant is fine-tuned with several seeds; COCO box/mask AP is evaluated during
fine-tuning to show convergence. Writes ``results.json``, ``results.md`` (the table) and
``curves.png`` (loss and AP over iterations) to ``--output-dir``.

    # the README's experiment (about 100 min on 2 cores; --finetune-iters 150 --seeds 0 for a quick look)
    python tools/ablate_integral.py --output-dir output/ablation --seeds 0 1 2 --finetune-iters 450 \
        --evals 3 --jobs 2 --pretrain-mim-mfm output/demo/pretrain/model_final.pth

Pre-training checkpoints are reused if present (``--pretrain-mim-mfm`` may point at the
``make demo`` one, which uses the same config and iterations).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CFG = "configs/pretrain/mim_mfm_itpn_tiny_cpu.py"
FINETUNE_CFG = "configs/COCO/mask_rcnn_itpn_tiny_demo.py"
VARIANTS = {
    # name: (which pre-training, train.backbone_load)
    "scratch": (None, "strict"),
    "encoder_only": ("mim", "encoder_only"),
    "integral_mim": ("mim", "strict"),
    "integral_mim_mfm": ("mim_mfm", "strict"),
}


THREADS = None  # torch threads per run when several run at once (--jobs)


def run(cmd, log_path):
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if THREADS:
        env.setdefault("OMP_NUM_THREADS", str(THREADS))
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log_path) as f:
            sys.stderr.write("".join(f.readlines()[-30:]))
        raise RuntimeError(f"command failed (exit {rc}); log: {log_path}")


def read_metrics(output_dir):
    rows = []
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def pretrain(kind, out, iters):
    ckpt = os.path.join(out, "model_final.pth")
    if os.path.exists(ckpt):
        print(f"[ablation] reusing {ckpt}")
        return ckpt
    cmd = [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", PRETRAIN_CFG,
           f"train.output_dir={out}", "train.seed=0"]
    if iters:
        cmd += [f"train.max_iter={iters}"]
    if kind == "mim":
        cmd += ["model.mfm_decoder=null", "model.teacher=null"]  # hydra syntax for None
    os.makedirs(out, exist_ok=True)
    run(cmd, os.path.join(out, "run.log"))
    return ckpt


def _ap(v):
    return 0.0 if v is None or math.isnan(v) else v


def finetune(variant, ckpt, load_mode, seed, iters, evals, out):
    if not os.path.exists(os.path.join(out, "model_final.pth")):
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", FINETUNE_CFG,
               f"train.output_dir={out}", f"train.seed={seed}", f"train.max_iter={iters}",
               f"train.eval_period={max(iters // evals, 1)}", f"train.checkpointer.period={iters}",
               "train.log_period=10", f"train.backbone_load={load_mode}",
               f"train.init_checkpoint={ckpt or ''}"]
        run(cmd, os.path.join(out, "run.log"))
    rows = read_metrics(out)
    loss = [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r]
    # A detector with no detection above the score threshold gets bbox/AP = NaN and no segm
    # row from COCOEvaluator ("No predictions from the model!"); in COCO terms it scores 0.
    # (iterations trained, box AP, mask AP); the final evaluation is logged one past max_iter - 1
    ap = [(min(r["iteration"] + 1, iters), _ap(r.get("bbox/AP")), _ap(r.get("segm/AP"))) for r in rows if "bbox/AP" in r]
    return {"variant": variant, "seed": seed, "loss": loss, "ap": ap, "box_AP": ap[-1][1], "mask_AP": ap[-1][2]}


def summarise(runs, variants):
    table = []
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        box = [r["box_AP"] for r in rs]
        mask = [r["mask_AP"] for r in rs]
        first_box = [r["ap"][0][1] for r in rs]

        def ms(x):
            return statistics.mean(x), (statistics.stdev(x) if len(x) > 1 else 0.0)

        curve = [statistics.mean(r["ap"][k][1] for r in rs) for k in range(len(rs[0]["ap"]))]
        table.append({"variant": v, "seeds": len(rs), "box_AP": ms(box), "mask_AP": ms(mask),
                      "box_AP_first_eval": ms(first_box), "first_eval_iter": rs[0]["ap"][0][0],
                      "eval_iters": [i for i, _, _ in rs[0]["ap"]], "box_AP_curve": curve})
    return table


def write_table(table, path, args):
    iters = " / ".join(str(i) for i in table[0]["eval_iters"])
    lines = [
        f"| variant | seeds | box AP (mean ± sd) | mask AP (mean ± sd) | box AP at iter {iters} (mean) |",
        "|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['variant']} | {t['seeds']} | {t['box_AP'][0]:.1f} ± {t['box_AP'][1]:.1f} | "
            f"{t['mask_AP'][0]:.1f} ± {t['mask_AP'][1]:.1f} | {' / '.join(f'{a:.1f}' for a in t['box_AP_curve'])} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot(runs, variants, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        its = [i for i, _ in rs[0]["loss"]]
        mean_loss = [statistics.mean(r["loss"][k][1] for r in rs) for k in range(len(its))]
        ax_loss.plot(its, mean_loss, label=v)
        ap_its = [i for i, _, _ in rs[0]["ap"]]
        ax_ap.plot(ap_its, [statistics.mean(r["ap"][k][1] for r in rs) for k in range(len(ap_its))], marker="o", label=v)
    ax_loss.set(xlabel="fine-tuning iteration", ylabel="total loss (mean over seeds)", title="fine-tuning loss")
    ax_ap.set(xlabel="fine-tuning iteration", ylabel="box AP (mean over seeds)", title="COCO box AP, itpn_synthetic_val")
    ax_loss.legend()
    ax_ap.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="output/ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-iters", type=int, default=None, help="default: the pre-training config's")
    p.add_argument("--finetune-iters", type=int, default=450, help="default: the demo's schedule")
    p.add_argument("--evals", type=int, default=3, help="evaluations during each fine-tuning run")
    p.add_argument("--pretrain-mim-mfm", default=None, help="reuse this MIM+MFM checkpoint (e.g. make demo's)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=1,
                   help="fine-tuning runs at once, each with cores/jobs torch threads (a detectron2 step is "
                        "largely single-threaded, so 2 jobs on 2 cores finish sooner than 1)")
    args = p.parse_args(argv)
    global THREADS
    if args.jobs > 1:
        THREADS = max(1, (os.cpu_count() or 1) // args.jobs)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()

    ckpts = {}
    needed = {VARIANTS[v][0] for v in args.variants} - {None}
    if "mim_mfm" in needed and args.pretrain_mim_mfm:
        ckpts["mim_mfm"] = args.pretrain_mim_mfm
    todo = sorted(needed - set(ckpts))
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            paths = pool.map(lambda k: pretrain(k, os.path.join(out, f"pretrain_{k}"), args.pretrain_iters), todo)
            ckpts.update(zip(todo, paths))
    except RuntimeError as e:
        sys.exit(f"[ablation] {e}")

    def one(job):
        v, seed = job
        kind, load_mode = VARIANTS[v]
        print(f"[ablation] fine-tuning {v}, seed {seed}", flush=True)
        return finetune(v, ckpts.get(kind), load_mode, seed, args.finetune_iters, args.evals,
                        os.path.join(out, f"ft_{v}_s{seed}"))

    jobs = [(v, seed) for seed in args.seeds for v in args.variants]
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = list(pool.map(one, jobs))
    except RuntimeError as e:
        sys.exit(f"[ablation] {e}")
    table = summarise(runs, args.variants)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "table": table}, f, indent=1)
    md = write_table(table, os.path.join(out, "results.md"), args)
    plot(runs, args.variants, os.path.join(out, "curves.png"))
    print(md)
    print(f"[ablation] {len(runs)} fine-tuning runs in {(time.perf_counter() - t0) / 60:.1f} min; "
          f"wrote {out}/results.md, results.json, curves.png")


if __name__ == "__main__":
    main()
