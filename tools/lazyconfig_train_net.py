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
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import itpn_d2  # noqa: E402,F401  (registers backbones, meta-archs, datasets)
from itpn_d2.checkpoint import ITPNCheckpointer  # noqa: E402
from itpn_d2.engine.trainer import AutocastTrainer  # noqa: E402

logger = logging.getLogger("itpn_d2")


def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret
    return None


def build_trainer(cfg, model, train_loader, optim):
    amp = cfg.train.get("amp", {}) or {}
    device = torch.device(cfg.train.device)
    if amp.get("enabled", False):
        if device.type == "cuda":
            return AMPTrainer(model, train_loader, optim)
        dtype = getattr(torch, amp.get("dtype", "bfloat16"))
        return AutocastTrainer(model, train_loader, optim, device_type=device.type, dtype=dtype)
    return SimpleTrainer(model, train_loader, optim)


def make_checkpointer(cfg, model, **kwargs):
    """Loads ``train.init_checkpoint`` refusing missing / mis-shaped backbone tensors
    (``train.backbone_load``: strict | encoder_only | partial); saves like detectron2's."""
    return ITPNCheckpointer(model, cfg.train.output_dir, backbone_load=cfg.train.get("backbone_load", "strict"), **kwargs)


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)

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
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers only.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="itpn_d2")
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        make_checkpointer(cfg, model).load(cfg.train.init_checkpoint)
        print(do_test(cfg, model))
    else:
        do_train(args, cfg)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
