"""The reference side of the pre-training benchmark: mmpretrain 1.2.0's iTPN pixel-B
(:data:`REFERENCE_CONFIG`), its optimizer recipe and its training step (optional extra ``bench``)."""
import os

import torch

from itpn_d2.utils.precision import autocast_ctx

from .train_step import TrainStep, make_optimizer

__all__ = ["REFERENCE_CONFIG", "ReferenceUnavailable", "build_reference", "build_reference_optimizer",
           "ReferenceStep"]

REFERENCE_CONFIG = "itpn-pixel_hivit-base-p16_8xb512-amp-coslr-800e_in1k"


class ReferenceUnavailable(RuntimeError):
    """mmpretrain, or the reference config inside it, is not installed."""


def build_reference(device):
    """mmpretrain's iTPN pixel-B model from the config shipped inside the package."""
    try:
        import mmpretrain
        from mmengine.config import Config
        from mmpretrain.registry import MODELS
        from mmpretrain.utils import register_all_modules
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed"
        raise ReferenceUnavailable(f"mmpretrain not importable ({type(e).__name__}: {e})") from e
    pkg = os.path.dirname(mmpretrain.__file__)
    cands = [os.path.join(pkg, ".mim", "configs", "itpn", REFERENCE_CONFIG + ".py"),
             os.path.join(pkg, "configs", "itpn", REFERENCE_CONFIG + ".py")]
    path = next((c for c in cands if os.path.exists(c)), None)
    if path is None:
        raise ReferenceUnavailable(f"{REFERENCE_CONFIG}.py not found in the mmpretrain package ({cands})")
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(path)
    mcfg = cfg.model
    if "data_preprocessor" not in mcfg and cfg.get("data_preprocessor") is not None:
        mcfg["data_preprocessor"] = cfg.data_preprocessor
    model = MODELS.build(mcfg)
    import logging

    from mmengine.logging import MMLogger

    # init_weights logs one INFO record per tensor: keep the report readable
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    model.init_weights()
    model = model.to(device).train()
    return model, path, build_reference_optimizer(cfg, model)


def build_reference_optimizer(cfg, model):
    """The reference recipe's optimizer: its config's AdamW and ``paramwise_cfg`` through
    mmengine's constructor (a plain OptimWrapper: AmpOptimWrapper is CUDA-only and the fp16
    loss scaler has no role in fp32 or bf16)."""
    from mmengine.optim import build_optim_wrapper

    ow = dict(cfg.optim_wrapper)
    ow["type"] = "OptimWrapper"
    ow.pop("loss_scale", None)
    return build_optim_wrapper(model, ow).optimizer


class ReferenceStep(TrainStep):
    """One pre-training step of mmpretrain's iTPN: data_preprocessor + model.loss."""

    def __init__(self, model, images, device, dtype, optimizer=None):
        from mmpretrain.structures import DataSample

        self.model, self.device, self.dtype = model, device, dtype
        # default_collate's format (a stacked batch), as mmengine's runner feeds it
        self.data = {"inputs": torch.stack(images), "data_samples": [DataSample() for _ in images]}
        self.opt = optimizer if optimizer is not None else make_optimizer(model)

    def loss(self):
        with autocast_ctx(self.device, self.dtype):
            # mmengine's preprocessor copies the host batch to the device, as in its training
            data = self.model.data_preprocessor(self.data, True)
            losses = self.model.loss(data["inputs"], data["data_samples"])
            loss, _ = self.model.parse_losses(losses)
        return loss
