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

Reliability (see the README section "Multi-process and multi-node runs"):
* ``--num-gpus N`` is detectron2's "processes per machine": N GPUs with NCCL, or, with
  ``train.device=cpu``, N CPU processes with gloo; ``--num-machines/--machine-rank/--dist-url``
  as in detectron2.
* Checkpoints are written atomically; pre-training data is a function of the iteration
  (``itpn_d2.data.build_resumable_train_loader``), so ``--resume`` continues the same stream.
* A NaN / inf loss term stops the run before the step, naming the term and the iteration.
* Bad input ends the run with a one-line ``ERROR:`` message and a non-zero exit status:
  an unknown config key on the command line (use ``+key=value`` to add one on purpose),
  a missing / truncated / foreign checkpoint, a non-finite loss.

Examples::

    python tools/lazyconfig_train_net.py --config-file configs/COCO/mask_rcnn_itpn_tiny_demo.py \
        train.device=cpu train.amp.enabled=False
    python tools/lazyconfig_train_net.py --config-file cfg.py --eval-only train.init_checkpoint=model.pth
"""
import logging
import os
import sys

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itpn_d2  # noqa: E402,F401  (registers backbones, meta-archs, datasets)
from itpn_d2.checkpoint import BackboneLoadError, CheckpointFileError, ITPNCheckpointer  # noqa: E402
from itpn_d2.data.resumable import set_loader_start_iter  # noqa: E402
from itpn_d2.engine.compile import maybe_compile  # noqa: E402
from itpn_d2.engine.distributed import create_ddp_model, launch, share_cpu_threads  # noqa: E402
from itpn_d2.engine.overrides import ConfigOverrideError, apply_overrides  # noqa: E402
from itpn_d2.engine.trainer import NonFiniteLossError, build_trainer  # noqa: E402

# Errors that are the user's input, not a bug: one clear line, no traceback.
USER_ERRORS = (ConfigOverrideError, CheckpointFileError, BackboneLoadError, NonFiniteLossError)

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

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = build_trainer(cfg, model, train_loader, optim)
    checkpointer = make_checkpointer(cfg, model, trainer=trainer)
    trainer.register_hooks(
        [
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
    # The loader's workers start with the first batch, inside trainer.train: still in time.
    if set_loader_start_iter(train_loader, start_iter):
        logger.info(f"Training data continues at iteration {start_iter} of its deterministic stream")
    elif start_iter > 0:
        logger.info("The training data loader restarts its stream on resume (not a resumable loader)")
    trainer.train(start_iter, cfg.train.max_iter)


def load_config(args):
    cfg = LazyConfig.load(args.config_file)
    return apply_overrides(cfg, args.opts)


def _last_checkpoint_note(cfg) -> str:
    try:
        with open(os.path.join(cfg.train.output_dir, "last_checkpoint")) as f:
            return f" Last complete checkpoint: {os.path.join(cfg.train.output_dir, f.read().strip())}."
    except OSError:
        return ""


def main(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers only.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="itpn_d2")
    share_cpu_threads(cfg.train.get("device", "cuda"))
    if args.eval_only:
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


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    try:
        # Checked here, before any process is spawned: a typo fails at once, on every machine.
        device = load_config(args).train.get("device", "cuda")
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


if __name__ == "__main__":
    invoke_main()
