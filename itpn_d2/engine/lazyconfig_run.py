"""One training or evaluation run of a LazyConfig, in one process: what detectron2's
``tools/lazyconfig_train_net.py`` does in its ``do_train`` / ``do_test`` / ``main``, with
iTPN's additions. ``tools/lazyconfig_train_net.py`` parses the command line and launches
:func:`guarded_run` on every process.

What a run adds over detectron2's script:

* the config is loaded with checked overrides and validated (:func:`load_run_config`), once
  per process;
* ``train.init_checkpoint`` goes through :class:`~itpn_d2.checkpoint.ITPNCheckpointer`, which
  refuses missing / mis-shaped backbone tensors (:func:`make_checkpointer`);
* the trainer (AMP on CPU and CUDA, gradient accumulation, finite-loss checks) comes from
  :func:`~itpn_d2.engine.trainer.build_trainer`, with per-step deterministic RNG, the
  ``skipped_images`` metric and ``train.extra_hooks`` registered (:func:`do_train`);
* ``--resume`` continues the data stream where the checkpoint stopped, and a run whose
  training is complete but whose ``model_final.pth`` or final evaluation is missing is
  finished instead of silently doing nothing (:func:`finish_completed_run`);
* bad input ends the process with one ``ERROR:`` line (:data:`USER_ERRORS`,
  :func:`guarded_run`): exit status 2 for a config error, 1 otherwise.
"""
import logging
import os

from detectron2.config import instantiate
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from itpn_d2.checkpoint import (
    BackboneLoadError,
    CheckpointFileError,
    CheckpointWriteError,
    ITPNCheckpointer,
    NonFiniteWeightsError,
    last_finite_checkpoint,
)
from itpn_d2.config import ConfigOverrideError, load_config, overrides_of, validate_config
from itpn_d2.data.resumable import NoReadableImagesError, attach_mask_generator, set_loader_start_iter
from itpn_d2.utils.user_errors import exit_on_user_error

from .compile import maybe_compile
from .determinism import DeterministicStepRNG
from .distributed import (
    OutputDirNotSharedError,
    check_shared_output_dir,
    create_ddp_model,
    end_process_group,
    share_cpu_threads,
)
from .run_lock import OutputDirLockedError
from .skipped_images import SkippedImagesMetric
from .trainer import NonFiniteLossError, TrainConfigError, amp_dtype_of, build_trainer

__all__ = [
    "USER_ERRORS",
    "load_run_config",
    "make_checkpointer",
    "do_test",
    "do_train",
    "finish_completed_run",
    "check_eval_weights",
    "run",
    "guarded_run",
]

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

# the run's log file is set up under this name (run), so its messages reach log.txt
logger = logging.getLogger("itpn_d2")

_LOADED = {}  # pid -> the config load_run_config returned in that process


def load_run_config(args):
    """The config of ``args.config_file`` with the command-line overrides, checked.

    Loaded once per process: a config file may register datasets, which detectron2 allows
    once, and the launching process checks the config before it spawns any worker; a run
    in that same process (one process per machine) reuses it."""
    cfg = _LOADED.get(os.getpid())
    if cfg is None:
        # positional overrides (detectron2's parser) or --opts, as the other tools take them
        cfg = load_config(args.config_file, overrides_of(args, "opts", "flag_opts"))
        validate_config(cfg, eval_only=args.eval_only)
        _LOADED[os.getpid()] = cfg
    return cfg


def do_test(cfg, model):
    """detectron2's: ``inference_on_dataset`` with ``dataloader.evaluator``, if the config has one."""
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret
    return None


def make_checkpointer(cfg, model, backbone_load=None, new_by_design=None, **kwargs) -> ITPNCheckpointer:
    """Loads ``train.init_checkpoint`` refusing missing / mis-shaped backbone tensors
    (``train.backbone_load``: strict | encoder_only | partial) except the keys the config
    declares new by design (``train.new_by_design_keys``); saves like detectron2's."""
    mode = backbone_load or cfg.train.get("backbone_load", "strict")
    if new_by_design is None:
        new_by_design = list(cfg.train.get("new_by_design_keys", None) or [])
    return ITPNCheckpointer(model, cfg.train.output_dir, backbone_load=mode, new_by_design=new_by_design, **kwargs)


def do_train(args, cfg) -> None:
    """Build the model, optimizer, loader and trainer of ``cfg``, load or resume, and train."""
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
    log_frozen_backbone(model, loaded=bool(cfg.train.init_checkpoint) or start_iter > 0)
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


def log_frozen_backbone(model, *, loaded: bool) -> None:
    """Say in the log that the backbone is frozen (``model.backbone.frozen=True``) and how many of its
    parameters the optimizer leaves out, and warn when its weights came from no file: a head would then
    train on the features of a random backbone."""
    backbone = getattr(getattr(model, "module", model), "backbone", None)  # through DDP
    if not getattr(backbone, "frozen", False):
        return
    n = sum(p.numel() for p in backbone.parameters())
    logger.info(f"The backbone is frozen: its {n:,} parameters do not train (eval mode, no gradients)")
    if not loaded:
        logger.warning(
            "The backbone is frozen but train.init_checkpoint is empty: the head trains on a randomly "
            "initialised backbone. Pass the fine-tuned checkpoint, e.g. train.init_checkpoint=<model_final.pth>."
        )


def finish_completed_run(cfg, model, checkpointer, start_iter: int) -> None:
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


def check_eval_weights(cfg, args) -> None:
    """``--eval-only`` evaluates trained weights: refuse a run without ``train.init_checkpoint``
    unless ``--random-weights`` asks for an untrained model on purpose."""
    if cfg.train.get("init_checkpoint", "") or getattr(args, "random_weights", False):
        return
    raise CheckpointFileError(
        "--eval-only needs weights: set train.init_checkpoint=PATH (add --random-weights to evaluate an "
        "untrained model on purpose)"
    )


def _last_checkpoint_note(cfg) -> str:
    path = last_finite_checkpoint(cfg.train.output_dir)
    if path is None:
        return " No checkpoint with finite weights exists in train.output_dir."
    return f" Last complete checkpoint with finite weights: {path}."


def run(args) -> None:
    """Train (or with ``args.eval_only``, evaluate) in this process: detectron2's ``main(args)``
    of ``tools/lazyconfig_train_net.py``. ``args`` as that tool's parser makes them."""
    cfg = load_run_config(args)
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers only.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="itpn_d2")
    share_cpu_threads(cfg.train.get("device", "cuda"))
    # Every process reads and writes checkpoints there: a node-local directory in a multi-node
    # run would make ranks resume from different iterations.
    check_shared_output_dir(cfg.train.output_dir)
    if args.eval_only:
        check_eval_weights(cfg, args)
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


def guarded_run(args) -> None:
    """:func:`run`, ending the process with one ``ERROR:`` line on a :data:`USER_ERRORS` error
    (exit status 2 for a config error, 1 otherwise). What ``launch`` runs on every process; a
    finished multi-process run tears its process group down (:func:`end_process_group`)."""
    try:
        run(args)
    except USER_ERRORS as e:
        exit_on_user_error(e, log=logger)
    end_process_group()
