#!/usr/bin/env python
"""Speed and memory of iTPN pre-training and detection, side by side with mmpretrain's iTPN.

Pre-training (``--what pretrain``): images/s of a whole training step (forward,
backward, AdamW step) at mask ratio 0.75 for a pre-training config, in fp32 and
under bf16 autocast. With ``--reference`` (default on for pixel configs) the same
step of mmpretrain 1.2.0's ``itpn-pixel_hivit-base-p16_8xb512-amp-coslr-800e_in1k``
model runs in the same process, rep by rep interleaved with ours, with the same
batch, resolution, mask ratio, optimizer and dtype; the tool prints the speed ratio
ours/reference, achieved GFLOP/s of both (FLOPs of one step from
``torch.utils.flop_counter``, 2 per multiply-add, forward + backward) and their
fraction of a 2048x2048 matmul's rate measured in the same run for the same dtype
(8192x8192 on a GPU). On a GPU under bf16/fp16 it also prints model FLOPs utilisation:
those step FLOPs per second over the card's dense tensor-core peak from its datasheet
(built-in for A100/H100/H200, ``--peak-tflops`` for others).
If mmpretrain is not installed, our side still runs and the reference is reported
as unavailable.

Training loop (``--what loop``): images/s of the pre-training step exactly as
``tools/lazyconfig_train_net.py`` runs it: the config's resumable loader over a folder of
generated JPEG-free PNGs (decode, RandomResizedCrop, flip in ``--workers`` DataLoader
workers, masks drawn there too where the code supports it), the trainer from
``build_trainer`` (finite check, metrics) and the config's optimizer. The step time
includes waiting for the loader, the host-to-device copy and the model's mask handling.

Detection (``--what det``): training-step time (forward, backward, AdamW) and
inference latency of a Mask R-CNN config on synthetic images at detectron2's usual
sizes (short side 800 -> 800x1216 padded, and 1024x1024).

Fine-tuning (``--what finetune``): images/s of the fine-tuning training step exactly as the
training script runs it, for each config of ``--finetune-configs`` (default: the demo's tiny
Mask R-CNN, its UPerNet head on a frozen backbone, and UPerNet fine-tuned whole): the config's
own loader on its built-in data, ``build_trainer``, its optimizer; ``--profile DIR`` writes
torch.profiler's table of a few steps per config.

Optimizers: each side's own recipe (``--optimizer recipe``, default): ours from the
pre-training config (``--opts optimizer.fused=True`` for the fused AdamW kernel), the
reference from its config's ``optim_wrapper`` (AdamW + ``paramwise_cfg``) through mmengine;
``--optimizer plain`` gives both the same 2-group torch AdamW. Detection (``--what det``) steps
its config's optimizer (layer-decay groups, fused AdamW) likewise, or the plain one with ``plain``.

bf16/fp16 on a CPU without native kernels (no AVX-512 bf16 / AMX: oneDNN reports it)
is skipped with a message: every bf16 matmul and convolution there is emulated at < 1
GFLOP/s, so a base-model step would take hours (``--force-bf16`` runs it anyway).

Peak memory: GPU ``torch.cuda.max_memory_allocated`` minus the other side's live tensors
(model, gradients, optimizer state), so each side's figure is its own; CPU the process's
resident-set high-water mark during one step (both models live in one process, so on CPU
it is a process figure, not a per-side one).

The pre-training step of ``--what pretrain`` feeds the model what the loader gives it in
training: uint8 images on the host with each sample's mask drawn beforehand (as the
DataLoader workers do), so the step includes the pinned host-to-device copy. FLOPs (and so
MFU) are counted with activation checkpointing switched off: recomputation is work the
card does, not model FLOPs. Detection heads run under autocast as in training
(``--det-bf16-heads fp32`` for the CPU-friendly variant). Detection also prints "peak allocated": live
tensor bytes at their peak from the profiler's allocation events, the quantity
``max_memory_allocated`` reports on a GPU, so a CPU run estimates what a card needs
(``--opts model.backbone.net.use_act_checkpoint=True`` for activation checkpointing).

Examples::

    # the README table: ours (mmpretrain layout) vs mmpretrain, batch 4, 224 px, fp32 + bf16
    python tools/benchmark.py --what pretrain --batch 4 --dtypes fp32,bf16 --opts optimizer.fused=True
    # detection at 800 and 1024 px, batch 1, few reps (CPU)
    python tools/benchmark.py --what det --quick
    # memory of the base detector at 1024x1024, batch 2, with activation checkpointing
    python tools/benchmark.py --what det --memory-only --det-batch 2 --det-sizes 1024x1024 --dtypes fp32 \
        --opts model.backbone.net.use_act_checkpoint=True
    # anything on a tiny model (tests): any config key can be overridden
    python tools/benchmark.py --quick --what pretrain,det --arch tiny --img 64 --det-sizes 128x128

The measurements are ``itpn_d2/benchmark/`` (with the timing, memory, FLOP and precision
helpers of ``itpn_d2/utils/``); this file is the command line.

Install the reference (optional extra ``bench``)::

    pip install --no-deps mmpretrain==1.2.0 mmengine==0.10.7 mmcv-lite==2.2.0 \
        addict yapf rich termcolor einops modelindex mat4py
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from itpn_d2.benchmark import BenchmarkOptionError, BenchmarkOptions, run_benchmark  # noqa: E402
from itpn_d2.config import add_opts_argument  # noqa: E402

# the defaults live in BenchmarkOptions (one place for the tool and for code that runs a benchmark)
DEFAULTS = BenchmarkOptions()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default=DEFAULTS.what, help="comma list of: pretrain, loop, det, finetune")
    p.add_argument("--config", default=DEFAULTS.config, help="pre-training LazyConfig (ours)")
    p.add_argument("--det-config", default=DEFAULTS.det_config, help="detection LazyConfig")
    p.add_argument("--finetune-configs", default=DEFAULTS.finetune_configs,
                   help="--what finetune: comma list of fine-tuning configs whose real training step is timed "
                        "on their own (built-in) data (default: the demo's Mask R-CNN, its frozen-backbone UPerNet, "
                        "and UPerNet fine-tuned whole)")
    p.add_argument("--arch", default=DEFAULTS.arch,
                   help="override model.backbone.net with hivit_arch(SIZE[,LAYOUT]), e.g. 'tiny' or 'base,official'")
    p.add_argument("--batch", type=int, default=DEFAULTS.batch,
                   help="pre-training batch (default: 512 on a GPU, the release's per-GPU batch of its 8xb512 "
                        "recipe; 4 on a CPU)")
    p.add_argument("--workers", type=int, default=DEFAULTS.workers, help="--what loop: DataLoader workers")
    p.add_argument("--loop-images", type=int, default=DEFAULTS.loop_images,
                   help="--what loop: images in the generated folder")
    p.add_argument("--img", type=int, default=DEFAULTS.img, help="pre-training resolution")
    p.add_argument("--mask-ratio", type=float, default=DEFAULTS.mask_ratio)
    p.add_argument("--dtypes", default=DEFAULTS.dtypes, help="comma list of fp32, bf16, fp16 (autocast)")
    p.add_argument("--reference", choices=["auto", "on", "off"], default=DEFAULTS.reference,
                   help="run mmpretrain's iTPN beside ours (auto: when comparable and installed)")
    p.add_argument("--det-batch", type=int, default=DEFAULTS.det_batch, help="detection batch (default 2 GPU, 1 CPU)")
    p.add_argument("--det-sizes", default=DEFAULTS.det_sizes, help="HxW list for detection")
    p.add_argument("--det-bf16-heads", choices=["fp32", "bf16"], default=DEFAULTS.det_bf16_heads,
                   help="under bf16/fp16 autocast, run the detection heads under autocast as training does "
                        "(bf16, default) or in fp32 (faster on CPUs without native bf16)")
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup)
    p.add_argument("--reps", type=int, default=DEFAULTS.reps)
    p.add_argument("--quick", action="store_true", help="1 warm-up, 3 reps (pretrain) / 1+1 (det)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our backbone and decoders in place, as train.compile.enabled=True does")
    p.add_argument("--force-bf16", action="store_true",
                   help="run bf16 even on a CPU without native bf16 (emulated: 100x+ slower)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULTS.peak_tflops,
                   help="GPU: the card's dense bf16/fp16 peak for MFU, when it is not in the built-in table")
    p.add_argument("--threads", type=int, default=DEFAULTS.threads, help="torch.set_num_threads")
    p.add_argument("--optimizer", choices=["recipe", "plain"], default=DEFAULTS.optimizer,
                   help="recipe: each side's own config (AdamW + its param groups); "
                        "plain: the same 2-group torch AdamW on both sides")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--memory-only", action="store_true",
                   help="detection: no timing; one warm-up training step (optimizer state exists), "
                        "then peak allocated of one training and one inference step "
                        "(on a GPU also max_memory_allocated)")
    p.add_argument("--profile", default=DEFAULTS.profile,
                   help="write torch.profiler tables of our pre-training step / of the fine-tuning steps here")
    add_opts_argument(p)  # applied to every config the run reads (pre-training and detection)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        run_benchmark(BenchmarkOptions(**vars(args)))
    except BenchmarkOptionError as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()
