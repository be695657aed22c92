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
A seed sets ``train.seed`` (the initialisation of every parameter not loaded from a checkpoint, drop path); every run reads the
same data stream (``dataloader.train.seed`` of the configs: image order, augmentations, MIM masks)
unless ``--vary-data`` seeds it with the run's seed as well.
The experiment itself (variants, runs, FLOP budgets, statistics, report) is
``itpn_d2/experiments/`` and ``itpn_d2/evaluation/paired_stats.py``.

    python tools/ablate_integral.py --output-dir output/ablation --seeds 0 1 2 3 4 --jobs 2 \
        --tasks det seg --seg-config configs/ADE20K/uper_itpn_tiny_demo.py
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from itpn_d2.experiments import BUDGETS, VARIANTS, AblationError, AblationOptions, run_ablation  # noqa: E402

# the defaults live in AblationOptions (one place for the tool and for code that runs the experiment)
DEFAULTS = AblationOptions()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=DEFAULTS.output_dir)
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULTS.seeds), help="fine-tuning seeds")
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=DEFAULTS.pretrain_seeds,
                   help="pre-training seeds; fine-tuning seed number i uses pre-training seed i mod their count "
                        "(default: one pre-training per fine-tuning seed, the same seed)")
    p.add_argument("--pretrain-iters", type=int, default=DEFAULTS.pretrain_iters,
                   help="the equal-iterations budget (configs/pretrain/mim_mfm_itpn_tiny_cpu.py's 500)")
    p.add_argument("--finetune-iters", type=int, default=DEFAULTS.finetune_iters, help="default: each task config's own schedule")
    p.add_argument("--evals", type=int, default=DEFAULTS.evals, help="evaluations during each fine-tuning run")
    p.add_argument("--variants", nargs="+", default=list(DEFAULTS.variants), choices=list(VARIANTS))
    p.add_argument("--budgets", nargs="+", default=list(DEFAULTS.budgets), choices=list(BUDGETS))
    p.add_argument("--tasks", nargs="+", default=list(DEFAULTS.tasks), choices=["det", "seg"])
    p.add_argument("--det-config", default=DEFAULTS.det_config)
    p.add_argument("--seg-config", default=DEFAULTS.seg_config, help="segmentation fine-tuning config (task seg)")
    p.add_argument("--seg-metric", default=DEFAULTS.seg_metric, help="metrics.json key of the segmentation metric")
    p.add_argument("--pretrain-mim-mfm", default=DEFAULTS.pretrain_mim_mfm,
                   help="reuse this MIM + MFM checkpoint as the equal-iterations one of the first pre-training "
                        "seed (same config and --pretrain-iters: e.g. configs/pretrain/mim_mfm_itpn_tiny_cpu.py's 500; a "
                        "checkpoint saved at another iteration is refused); its metrics.json beside it is "
                        "used for the MIM-loss curve")
    p.add_argument("--report-only", action="store_true", help="no new runs: report the finished ones")
    p.add_argument("--jobs", type=int, default=DEFAULTS.jobs,
                   help="runs at once, each with cores/jobs torch threads (a detectron2 step is "
                        "largely single-threaded, so 2 jobs on 2 cores finish sooner than 1)")
    p.add_argument("--vary-data", action="store_true",
                   help="seed the data stream (image order, augmentations, masks) with each seed too, so the "
                        "intervals cover data order; default: data seed 0 for every run, a seed varies "
                        "initialisation and drop path. Folders get a _data suffix")
    args = p.parse_args(argv)
    try:
        run_ablation(AblationOptions(**vars(args)))
    except AblationError as e:
        sys.exit(f"[ablation] {e}")


if __name__ == "__main__":
    main()
