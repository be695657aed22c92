"""The pre-training step both sides of the benchmark time: :class:`TrainStep` and our
:class:`OursStep` (the mmpretrain one is :class:`itpn_d2.benchmark.reference.ReferenceStep`), the
inputs as the training loader hands them over (:func:`loader_inputs`), the optimizers, and the
model FLOPs of a step (:func:`model_flops`)."""
import torch

from itpn_d2.utils.flops import count_flops
from itpn_d2.utils.precision import autocast_ctx

from .options import load_cfg

__all__ = [
    "build_ours",
    "build_ours_optimizer",
    "param_groups",
    "make_optimizer",
    "synthetic_images",
    "TrainStep",
    "loader_inputs",
    "model_flops",
    "OursStep",
]


def build_ours(args, device):
    """Our pre-training model of ``args.config`` at ``args.img`` px and ``args.mask_ratio``, in train mode."""
    from detectron2.config import instantiate

    cfg = load_cfg(args.config, args)
    cfg.model.backbone.net.pretrain_img_size = args.img
    if "pixel_decoder" in cfg.model and cfg.model.pixel_decoder is not None:
        cfg.model.pixel_decoder.pretrain_img_size = args.img
    cfg.model.mask_ratio = args.mask_ratio
    model = instantiate(cfg.model).to(device).train()
    return model, cfg


def build_ours_optimizer(cfg, model):
    """Our recipe's optimizer (``cfg.optimizer``: AdamW + param groups), as the training
    script builds it; ``--opts optimizer.fused=True`` selects the fused AdamW kernel."""
    from detectron2.config import instantiate

    ocfg = cfg.optimizer
    ocfg.params.model = model
    opt = instantiate(ocfg)
    del ocfg.params.model
    return opt


def param_groups(model, weight_decay=0.05):
    """Two groups (decay on >= 2-D weights only), identical for both sides."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model):
    """The plain AdamW both sides share with ``--optimizer plain``."""
    return torch.optim.AdamW(param_groups(model), lr=1.5e-4, betas=(0.9, 0.95))


def synthetic_images(batch, img, seed=0):
    """``batch`` random uint8 images of ``img`` x ``img`` pixels."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, img, img), generator=g, dtype=torch.uint8) for _ in range(batch)]


class TrainStep:
    """One optimizer step (``__call__``) or forward + backward only (``fwd_bwd``) of
    ``self.loss()``: the same code times both sides."""

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def fwd_bwd(self):
        self.loss().backward()

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.fwd_bwd()
        self.opt.step()


def loader_inputs(model, images, seed=0):
    """What the training loader hands the model: uint8 host images, each with the mask its
    DataLoader worker drew from the sample's seed (``ids_keep``, ``mask``), when this version
    of the code draws masks there; else the seed (the model draws the mask in the step)."""
    try:
        from itpn_d2.modeling.masking import mask_from_seed
    except ImportError:
        mask_from_seed = None
    out = []
    for i, im in enumerate(images):
        d = {"image": im, "mask_seed": seed + i}
        if mask_from_seed is not None:
            u = model.unit_size
            d["ids_keep"], d["mask"] = mask_from_seed(
                model.mask_generator, (im.shape[-2] // u, im.shape[-1] // u), model.mask_ratio, seed + i)
        out.append(d)
    return out


def model_flops(fn, *models) -> int:
    """FLOPs of ``fn`` with activation checkpointing off in ``models`` (HiViT's
    ``use_act_checkpoint``): the recomputed forward in backward is not model work."""
    saved = []
    for m in models:
        for mod in m.modules():
            if getattr(mod, "use_act_checkpoint", False):
                saved.append(mod)
                mod.use_act_checkpoint = False
    try:
        return count_flops(fn)
    finally:
        for mod in saved:
            mod.use_act_checkpoint = True


class OursStep(TrainStep):
    """One pre-training step of our MaskedPretrainer, from host inputs as the loader gives them."""

    def __init__(self, model, images, device, dtype, forward=None, optimizer=None):
        self.model, self.device, self.dtype = model, device, dtype
        self.inputs = loader_inputs(model, images)
        self.opt = optimizer if optimizer is not None else make_optimizer(model)
        self.forward = forward if forward is not None else model

    def loss(self):
        with autocast_ctx(self.device, self.dtype):
            losses = self.forward(self.inputs)
        return sum(losses.values())
