#!/usr/bin/env python
"""Train or evaluate with a LazyConfig: detectron2's ``tools/lazyconfig_train_net.py``
plus what iTPN users on CPU need.

Additions over detectron2's script (our configs also run under the stock one):
* ``train.amp.enabled=True`` on CPU runs the forward pass under bf16 autocast
  (detectron2's AMPTrainer is CUDA-only); ``train.amp.dtype`` may name another dtype.
* ``train.init_checkpoint`` is loaded by :class:`itpn_d2.checkpoint.ITPNCheckpointer`, which
  refuses a checkpoint whose backbone keys are missing or mis-shaped and lists them
  (``train.backbone_load``: strict | encoder_only | partial).
* ``train.extra_hooks``: a list of LazyCall hooks (e.g. ``ReconstructionVisualizer``).
* ``train.compile.enabled=True``: ``torch.compile`` the backbone and decoders in place
  (:mod:`itpn_d2.engine.compile`; ``train.compile.options`` go to ``torch.compile``).
* ``train.amp.dtype`` (bfloat16 / float16) is honoured on CUDA too (fp16 with a GradScaler,
  bf16 without); ``train.grad_accum_steps=k`` accumulates k batches per optimizer step
  (:mod:`itpn_d2.engine.trainer`). A multi-process run refuses a ``train.output_dir`` that
  not every process sees.

Reliability (see the README section "Multi-process and multi-node runs"):
* ``--num-gpus N`` is detectron2's "processes per machine": N GPUs with NCCL, or, with
  ``train.device=cpu``, N CPU processes with gloo; ``--num-machines/--machine-rank/--dist-url``
  as in detectron2.
* Checkpoints are written atomically; training data is a function of the iteration
  (``itpn_d2.data.build_resumable_train_loader``: pre-training, COCO and ADE20K configs), so
  ``--resume`` continues the same stream; drop path and the step's other random draws derive
  from (seed, iteration, sample / rank) (``itpn_d2.engine.determinism.DeterministicStepRNG``).
* A NaN / inf loss term stops the run before the step, naming the term and the iteration.
* Bad input ends the run with a one-line ``ERROR:`` message and a non-zero exit status:
  an unknown config key on the command line (use ``+key=value`` to add one on purpose),
  a missing / truncated / foreign checkpoint, a non-finite loss.

Examples::

    python tools/lazyconfig_train_net.py --config-file configs/COCO/mask_rcnn_itpn_tiny_demo.py \
        train.device=cpu train.amp.enabled=False
    python tools/lazyconfig_train_net.py --config-file cfg.py --eval-only train.init_checkpoint=model.pth

Overrides go last, positional as in detectron2's script or after ``--opts`` as in every other
tool of this repository (``--eval-only --opts train.init_checkpoint=model.pth``).

This script parses the command line, takes the output directory's lock and launches the
processes; what each process runs (detectron2's ``do_train`` / ``do_test`` / ``main``) is
:mod:`itpn_d2.engine.lazyconfig_run`.
"""
import os
import sys

import torch
from detectron2.engine import default_argument_parser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itpn_d2  # noqa: E402,F401  (registers backbones, meta-archs, datasets)
from itpn_d2.config import add_opts_argument  # noqa: E402
from itpn_d2.engine.distributed import launch  # noqa: E402
from itpn_d2.engine.lazyconfig_run import USER_ERRORS, guarded_run, load_run_config, logger  # noqa: E402
from itpn_d2.engine.run_lock import lock_output_dir  # noqa: E402
from itpn_d2.utils.user_errors import exit_on_user_error  # noqa: E402


def get_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="with --eval-only and no train.init_checkpoint: evaluate an untrained model on purpose",
    )
    add_opts_argument(parser, dest="flag_opts")
    return parser


def invoke_main() -> None:
    args = get_parser().parse_args()
    try:
        # Checked here, before any process is spawned: a typo fails at once, on every machine.
        # A single-process run reuses this config (the run happens in this process).
        cfg = load_run_config(args)
        device = cfg.train.get("device", "cuda")
        # One live run per output directory; the lock goes with this process (a killed run's
        # lock is free at once). Machine 0 holds it for a multi-machine run.
        lock = lock_output_dir(cfg.train.output_dir) if args.machine_rank == 0 else None
    except USER_ERRORS as e:
        exit_on_user_error(e, log=logger)
    try:
        launch(
            guarded_run,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            device=device,
        )
    except torch.multiprocessing.ProcessExitedException as e:
        # a worker already printed its ERROR line (guarded_run); its exit code is ours
        print(f"ERROR: process {e.error_index} exited with code {e.exit_code}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code or 1)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    invoke_main()
