"""AdamW with HiViT layer-wise learning-rate decay (the iTPN fine-tuning recipe).

Param groups come from detectron2's ``get_default_optimizer_params``:

* lr: ``optimizer.lr`` times the HiViT layer-decay factor of the parameter
  (``itpn_d2.lr_decay``; pyramid and heads at full rate). The number of layers follows
  ``model.backbone.net`` through interpolation, so patching the arch needs no second edit;
  a config only sets ``optimizer.params.lr_factor_func.lr_decay_rate``.
* weight decay 0.05, except 0 for norm layers (``weight_decay_norm``), biases
  (``weight_decay_bias``), the absolute position embedding, relative position bias tables
  and layer-scale vectors, as the reference's optimizer constructor does for 1-D
  parameters and its ``no_weight_decay`` names. (detectron2's own ``layers.LayerNorm``
  in the RPN / ROI heads is not a ``torch.nn.LayerNorm``, so its weight keeps decay.)

Usage (like detectron2's ``common/optim.py``)::

    from ..common.optim import AdamW as optimizer
    optimizer.lr = 2e-4
    optimizer.params.lr_factor_func.lr_decay_rate = 0.9
"""
import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from itpn_d2.lr_decay import hivit_lr_factor_func

NO_DECAY = {"weight_decay": 0.0}

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # params.model is set to the model object before instantiating the optimizer.
        base_lr="${..lr}",
        weight_decay_norm=0.0,
        weight_decay_bias=0.0,
        lr_factor_func=L(hivit_lr_factor_func)(
            lr_decay_rate=0.9,
            mlp_depths="${....model.backbone.net.mlp_depths}",
            depth="${....model.backbone.net.depth}",
        ),
        overrides={
            "absolute_pos_embed": NO_DECAY,
            "relative_position_bias_table": NO_DECAY,
            "gamma_1": NO_DECAY,
            "gamma_2": NO_DECAY,
        },
    ),
    lr=2e-4,
    betas=(0.9, 0.999),
    weight_decay=0.05,
    # one fused kernel instead of ~10 small ops per tensor: AdamW fell from 10% to 2.5% of a
    # CPU pre-training step (tools/benchmark.py --profile); same algorithm.
    fused=True,
)
