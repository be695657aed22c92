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
"""
import logging
import os
import sys

import torch
from detectron2.config import instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itpn_d2  # noqa: E402,F401  (registers backbones, meta-archs, datasets)
from itpn_d2.checkpoint import (  # noqa: E402
    BackboneLoadError,
    CheckpointFileError,
    CheckpointWriteError,
    ITPNCheckpointer,
    NonFiniteWeightsError,
    last_finite_checkpoint,
)
from itpn_d2.data.resumable import NoReadableImagesError, attach_mask_generator, set_loader_start_iter  # noqa: E402
from itpn_d2.engine.compile import maybe_compile  # noqa: E402
from itpn_d2.engine.determinism import DeterministicStepRNG  # noqa: E402
from itpn_d2.engine.distributed import (  # noqa: E402
    OutputDirNotSharedError,
    check_shared_output_dir,
    create_ddp_model,
    launch,
    share_cpu_threads,
)
from itpn_d2.config import ConfigOverrideError, add_opts_argument, load_config as load_checked_config  # noqa: E402
from itpn_d2.config import overrides_of, validate_config  # noqa: E402
from itpn_d2.engine.run_lock import OutputDirLockedError, lock_output_dir  # noqa: E402
from itpn_d2.engine.skipped_images import SkippedImagesMetric  # noqa: E402
from itpn_d2.engine.trainer import NonFiniteLossError, TrainConfigError, amp_dtype_of, build_trainer  # noqa: E402

# Errors that are the user's input, not a bug: one clear line, no traceback.
USER_ERRORS = (
    ConfigOverrideError,
    CheckpointFileError,
    CheckpointWriteError,
    BackboneLoadError,
    NonFiniteLossError,
    NonFiniteWeightsError,
    NoReadableImagesError,
    OutputDirLockedError,
    OutputDirNotSharedError,
    TrainConfigError,
)

logger = logging.getLogger("itpn_d2")


def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret
    return None


def make_checkpointer(cfg, model, backbone_load=None, new_by_design=None, **kwargs):
    """Loads ``train.init_checkpoint`` refusing missing / mis-shaped backbone tensors
    (``train.backbone_load``: strict | encoder_only | partial) except the keys the config
    declares new by design (``train.new_by_design_keys``); saves like detectron2's."""
    mode = backbone_load or cfg.train.get("backbone_load", "strict")
    if new_by_design is None:
        new_by_design = list(cfg.train.get("new_by_design_keys", None) or [])
    return ITPNCheckpointer(model, cfg.train.output_dir, backbone_load=mode, new_by_design=new_by_design, **kwargs)


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)
    maybe_compile(model, cfg.train.get("compile", None))

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    if hasattr(model, "mask_generator"):  # pre-training: masks drawn in the DataLoader workers
        attach_mask_generator(train_loader, model.mask_generator, model.mask_ratio, model.unit_size)

    model = create_ddp_model(model, **cfg.train.ddp, amp_dtype=amp_dtype_of(cfg))
    trainer = build_trainer(cfg, model, train_loader, optim)
    checkpointer = make_checkpointer(cfg, model, trainer=trainer)
    trainer.register_hooks(
        [
            DeterministicStepRNG(cfg.train.get("seed", None)),  # drop path etc.: f(seed, iteration, sample)
            SkippedImagesMetric(cfg.train.log_period),  # every process: summed over them
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period
            )
            if comm.is_main_process()
            else None,
            # e.g. [L(ReconstructionVisualizer)(period=...)]; instantiated after the model exists
            *[instantiate(h) for h in cfg.train.get("extra_hooks", None) or []],
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if start_iter >= cfg.train.max_iter:
        finish_completed_run(cfg, model, checkpointer, start_iter)
        return
    # The loader's workers start with the first batch, inside trainer.train: still in time.
    # An iteration reads grad_accum_steps batches of the stream.
    k = trainer.grad_accum_steps
    if set_loader_start_iter(train_loader, start_iter * k):
        logger.info(
            f"Training data continues at iteration {start_iter} of its deterministic stream"
            + (f" (batch {start_iter * k}: {k} batches per iteration)" if k > 1 else "")
        )
    elif start_iter > 0:
        logger.info("The training data loader restarts its stream on resume (not a resumable loader)")
    trainer.train(start_iter, cfg.train.max_iter)


def finish_completed_run(cfg, model, checkpointer, start_iter):
    """``--resume`` of a run whose last checkpoint is at its last iteration: all training is done,
    but a process killed while writing ``model_final.pth`` (or before its final evaluation) left
    the run unfinished. Write what is missing instead of training nothing and exiting 0."""
    final = os.path.join(cfg.train.output_dir, "model_final.pth")
    logger.info(
        f"--resume: the last checkpoint is at iteration {start_iter - 1}, the last of train.max_iter="
        f"{cfg.train.max_iter}; nothing left to train."
    )
    if comm.is_main_process() and not os.path.isfile(final):
        checkpointer.save("model_final", iteration=start_iter - 1)
        logger.info(f"Wrote the missing {final} from the last checkpoint")
    comm.synchronize()
    if cfg.train.get("eval_period", 0) and cfg.train.eval_period > 0:
        do_test(cfg, model)


_PRELOADED = {}  # pid -> config loaded by invoke_main in this process


def load_config(args):
    """The config with the command-line overrides, checked; loaded once per process (a config
    may register datasets, which detectron2 allows once)."""
    cfg = _PRELOADED.get(os.getpid())
    if cfg is None:
        # positional overrides (detectron2's parser) or --opts, as the other tools take them
        cfg = load_checked_config(args.config_file, overrides_of(args, "opts", "flag_opts"))
        validate_config(cfg, eval_only=args.eval_only)
        _PRELOADED[os.getpid()] = cfg
    return cfg


def _last_checkpoint_note(cfg) -> str:
    path = last_finite_checkpoint(cfg.train.output_dir)
    if path is None:
        return " No checkpoint with finite weights exists in train.output_dir."
    return f" Last complete checkpoint with finite weights: {path}."


def _check_eval_weights(cfg, args) -> None:
    if cfg.train.get("init_checkpoint", "") or getattr(args, "random_weights", False):
        return
    raise CheckpointFileError(
        "--eval-only needs weights: set train.init_checkpoint=PATH (add --random-weights to evaluate an "
        "untrained model on purpose)"
    )


def main(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers only.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="itpn_d2")
    share_cpu_threads(cfg.train.get("device", "cuda"))
    # Every process reads and writes checkpoints there: a node-local directory in a multi-node
    # run would make ranks resume from different iterations.
    check_shared_output_dir(cfg.train.output_dir)
    if args.eval_only:
        _check_eval_weights(cfg, args)
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        maybe_compile(model, cfg.train.get("compile", None))
        model = create_ddp_model(model)
        # A model to evaluate is a trained one: all of its backbone must be in the file, whatever
        # train.backbone_load the config uses for pre-trained weights.
        make_checkpointer(cfg, model, backbone_load="strict", new_by_design=[]).load(cfg.train.init_checkpoint)
        print(do_test(cfg, model))
    else:
        try:
            do_train(args, cfg)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(str(e) + _last_checkpoint_note(cfg)) from None
        except NonFiniteWeightsError as e:
            raise NonFiniteWeightsError(str(e).split(" Last checkpoint")[0] + _last_checkpoint_note(cfg)) from None


def _fail(e: BaseException) -> "NoReturn":  # noqa: F821
    # the key report of a BackboneLoadError is the point; everything else is one line
    msg = str(e) if isinstance(e, BackboneLoadError) else str(e).splitlines()[0]
    logger.error(msg)
    print(f"ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(2 if isinstance(e, ConfigOverrideError) else 1)


def guarded_main(args):
    try:
        main(args)
    except USER_ERRORS as e:
        _fail(e)


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
        # A single-process run reuses this config (main() runs in this process).
        cfg = load_config(args)
        device = cfg.train.get("device", "cuda")
        # One live run per output directory; the lock goes with this process (a killed run's
        # lock is free at once). Machine 0 holds it for a multi-machine run.
        lock = lock_output_dir(cfg.train.output_dir) if args.machine_rank == 0 else None
    except USER_ERRORS as e:
        _fail(e)
    try:
        launch(
            guarded_main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            device=device,
        )
    except torch.multiprocessing.ProcessExitedException as e:
        # a worker already printed its ERROR line (guarded_main); its exit code is ours
        print(f"ERROR: process {e.error_index} exited with code {e.exit_code}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code or 1)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    invoke_main()
