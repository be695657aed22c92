"""AdamW with HiViT layer-wise learning-rate decay, as the iTPN release's detection recipe.

Param groups come from :func:`itpn_d2.lr_decay.layer_decay_param_groups`, which builds them
as the release's mmcv constructor does:

* lr: ``optimizer.lr`` times the layer-decay factor of the parameter. Rule ``"release_det"``
  (sunsmarterjie/iTPN ``det/mmcv_custom/layer_decay_optimizer_constructor.py``, quirks
  included: last block ``rate ** -1``, position embedding 1.0; see ``itpn_d2/lr_decay.py``).
  ``rule="itpn_d2"`` selects this project's earlier convention. The number of layers follows
  ``model.backbone.net`` through interpolation; a config sets only
  ``optimizer.params.lr_factor_func.lr_decay_rate``.
* weight decay 0.05 except on 1-D tensors (every norm and layer-scale, heads included), biases,
  ``*_token`` and ``*pos_embed`` (``no_weight_decay="release_det"``). Relative-position tables are
  2-D and decayed, as released (its config's ``custom_keys`` are ignored by that constructor).

Usage (like detectron2's ``common/optim.py``)::

    from ..common.optim import AdamW as optimizer
    optimizer.params.lr_factor_func.lr_decay_rate = 0.9
"""
import torch
from detectron2.config import LazyCall as L

from itpn_d2.lr_decay import hivit_lr_factor_func, layer_decay_param_groups

AdamW = L(torch.optim.AdamW)(
    params=L(layer_decay_param_groups)(
        # params.model is set to the model object before instantiating the optimizer.
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        lr_factor_func=L(hivit_lr_factor_func)(
            rule="release_det",
            lr_decay_rate=0.9,
            mlp_depths="${....model.backbone.net.mlp_depths}",
            depth="${....model.backbone.net.depth}",
        ),
        no_weight_decay="release_det",
    ),
    lr=2e-4,
    betas=(0.9, 0.999),
    weight_decay=0.05,
    # one fused kernel instead of ~10 small ops per tensor: AdamW fell from 10% to 2.5% of a
    # CPU pre-training step (tools/benchmark.py --profile); same algorithm.
    fused=True,
)
