#!/usr/bin/env python
"""GPU acceptance check, one command: every figure a first GPU run should give, in one JSON.

Stages (each a subprocess with its own time budget; a failing or timed-out stage is
recorded with its error text and the others still run):

  1. pretrain   a pre-training step of the mmpretrain-layout base model
                (``configs/pretrain/mim_itpn_base_mmpretrain_800ep.py``) beside mmpretrain
                1.2.0's iTPN in bf16: img/s of both, the ratio, GFLOP/s, MFU against the
                card's datasheet peak (``tools/benchmark.py --what pretrain``). Without the
                ``bench`` extra the reference is recorded as unavailable and our side still runs.
  2. det        Mask R-CNN base (``configs/COCO/mask_rcnn_itpn_base_1x.py``) at 1024x1024,
                batch 2, bf16: s/iteration and ``torch.cuda.max_memory_allocated`` of a training
                step, with and without activation checkpointing (``tools/benchmark.py --what det``).
  3. seg        UPerNet base (``configs/ADE20K/uper_itpn_base_160k.py``) at 512x512, batch 4,
                bf16: s/iteration and peak memory of a training step (this file, ``--seg-worker``).
  4. finetune   the demo's fine-tuning (``configs/COCO/mask_rcnn_itpn_tiny_demo.py``) on the
                built-in generated data (``datasets/generate_synthetic.py``) for a few hundred
                iterations with ``train.device=cuda`` and bf16 AMP, then COCO evaluation: the
                box AP proves the CUDA training and evaluation paths end to end.

On a GPU the whole check is sized to finish in under 8 minutes (``--budget``). On a machine
without CUDA (or with ``--cpu``) the same stages and code paths run at tiny sizes (tiny
HiViT, small images, 2-4 iterations, fp32: a CPU without native bf16 would emulate it) in
about two minutes; ``tests/tools/test_gpu_check.py`` runs that mode.

    python tools/gpu_check.py                       # GPU: writes output/gpu_check/gpu_check.json
    python tools/gpu_check.py --cpu --out /tmp/gc   # the CPU mode
    make gpu-check

The JSON holds ``machine`` (hostname, CPU, cores, RAM, GPU, its memory, driver, CUDA),
``versions`` (python, torch, torchvision, detectron2, timm, mmpretrain/mmengine when
installed, the git commit), ``stages`` (per stage: status ok/failed/timeout/skipped,
seconds, the command, its figures, the error text and the log path) and ``total_seconds``.
Exit status 0 when every stage is ok, else 1. The stages and the JSON are
``itpn_d2/benchmark/gpu_check.py``; this file is the command line.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from itpn_d2.benchmark.gpu_check import STAGES, run_gpu_check  # noqa: E402
from itpn_d2.benchmark.segmentation import seg_worker  # noqa: E402
from itpn_d2.engine.trainer import NonFiniteLossError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the tiny CPU mode (automatic without CUDA)")
    p.add_argument("--out", default="output/gpu_check", help="folder for the JSON, logs and the fine-tuning run")
    p.add_argument("--json", default=None, help="JSON path (default OUT/gpu_check.json)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 470 GPU, 900 CPU)")
    # internal: the segmentation stage's subprocess
    p.add_argument("--seg-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seg-size", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--seg-batch", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--seg-dtype", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--seg-arch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seg-warmup", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seg-reps", type=int, default=3, help=argparse.SUPPRESS)
    # config overrides of the segmentation worker, as every tool's --opts (last on the line)
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.seg_worker:
        try:
            seg_worker(device=args.device, size=args.seg_size, batch=args.seg_batch, dtype=args.seg_dtype,
                       arch=args.seg_arch, warmup=args.seg_warmup, reps=args.seg_reps, opts=args.opts)
        except NonFiniteLossError as e:
            raise SystemExit(str(e))
        return 0
    try:
        report = run_gpu_check(cpu=args.cpu, out=args.out, json_path=args.json, budget=args.budget,
                               stages=[s.strip() for s in args.stages.split(",") if s.strip()])
    except ValueError as e:
        raise SystemExit(str(e))
    failed = [n for n, r in report["stages"].items() if r["status"] != "ok"]
    if failed:
        print(f"[gpu_check] stages not ok: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
