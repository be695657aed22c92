"""Layer-wise learning-rate decay for HiViT's block sequence, as the iTPN release computes it.

Use with :func:`layer_decay_param_groups` (or detectron2's ``get_default_optimizer_params(...,
lr_factor_func=...)``), like ViTDet's ``get_vit_lr_decay_rate``. ViTDet's function cannot be
reused: it assumes ``blocks.i`` is layer ``i + 1`` of a plain ViT, while HiViT's ``blocks`` is one
list holding MLP blocks, a PatchMerge, MLP blocks, a PatchMerge and the attention blocks.

Three rules, chosen by name (``hivit_lr_factor_func(rule=...)``). ``N = len(net.blocks) =
m1 + m2 + 2 + depth`` (32 for base 3/3/24, 46 for large 2/2/40), which is the release configs'
``num_layers`` (30 / 44) plus the 2 their constructors add:

``"release_det"`` (default of the COCO configs): the release's detection constructor
(sunsmarterjie/iTPN ``det/mmcv_custom/layer_decay_optimizer_constructor.py``, BEiT's, used by
every ``det/configs/itpn/*.py``): layer id 0 for ``patch_embed``, ``i + 1`` for ``blocks.i``,
``N - 1`` for anything else; factor ``rate ** (N - id - 1)``.

==============================================  =======================
parameter                                        lr factor
==============================================  =======================
``backbone.net.patch_embed.*``                   ``rate ** (N - 1)``
``backbone.net.blocks.i.*`` (any block kind)     ``rate ** (N - 2 - i)``
``backbone.net.absolute_pos_embed``              ``1.0``
pyramid, heads, anything else                    ``1.0``
==============================================  =======================

Two quirks of the release, kept because the published numbers (53.0 box AP / 46.5 mask AP for
pixel B 1x) were trained with them: the last block gets ``rate ** -1`` (> 1: its
``num_layers`` is 2 short of the block count it indexes with), and the absolute position
embedding is not decayed at all (the constructor gives layer 0 to the name
``backbone.pos_embed``; HiViT's is ``absolute_pos_embed``, which falls to "anything else").

``"release_seg"`` (default of the ADE20K configs): the release's segmentation constructor
(``seg/mmcv_custom/itpn_layer_decay_optimizer_constructor.py``): the same layer ids except that
``absolute_pos_embed`` is layer 0, and the per-layer rate is spread over the depth,
``d = rate ** (13 / N)``; factor ``d ** (N - id - 1)``. Base at 0.90: ``d = 0.9581``,
patch embedding and position embedding ``d ** 31 = 0.26``, last block ``d ** -1 = 1.04``.

``"itpn_d2"`` (this project's earlier convention, for comparison and ablations): layer id 0 for
``patch_embed`` and ``absolute_pos_embed``, ``i + 1`` for ``blocks.i``, ``N + 1`` for the rest;
factor ``rate ** (N + 1 - id)``: the last block gets exactly ``rate``, nothing exceeds 1, the
embeddings get ``rate ** (N + 1)`` (0.031 for base at 0.90).

Weight decay (:func:`layer_decay_param_groups`, ``no_weight_decay=``) follows the same two
constructors: ``"release_det"`` exempts 1-D tensors (norms, layer-scale, biases), ``*.bias``,
``*_token`` and ``*pos_embed``; ``"release_seg"`` exempts 1-D tensors and ``*.bias`` only (its
check for ``absolute_pos_embed`` compares the short name against full names and never matches,
so the position embedding and the relative position tables are decayed, as released).

PatchMerge counts as a layer in every rule (the release indexes ``blocks`` the same way).
Names are matched by their ``backbone.net.`` prefix (detection and segmentation models).
"""
from functools import partial
from typing import Callable, Dict, List, Sequence

import torch

__all__ = [
    "get_hivit_lr_decay_rate",
    "release_det_lr_decay_rate",
    "release_seg_lr_decay_rate",
    "hivit_num_layers",
    "hivit_lr_factor_func",
    "layer_decay_param_groups",
    "LR_DECAY_RULES",
    "NO_WEIGHT_DECAY_RULES",
]


def hivit_num_layers(mlp_depths: Sequence[int], depth: int) -> int:
    """``len(HiViT.blocks)``: MLP blocks of both stages, the two PatchMerges, the attention blocks."""
    m1, m2 = mlp_depths
    return int(m1) + int(m2) + 2 + int(depth)


def _layer_id(name: str, num_layers: int) -> int:
    # Only the encoder under `backbone.net` decays; the pyramid and every head are "after" it.
    if not name.startswith("backbone.net."):
        return num_layers + 1
    rest = name[len("backbone.net.") :]
    if rest.startswith("patch_embed.") or rest == "absolute_pos_embed":
        return 0
    if rest.startswith("blocks."):
        idx = rest.split(".")[1]
        if not idx.isdigit():
            raise ValueError(f"cannot read a block index from parameter name {name!r}")
        i = int(idx)
        if i >= num_layers:
            raise ValueError(
                f"parameter {name!r} is block {i} but num_layers={num_layers}: num_layers must be "
                f"len(net.blocks) = m1 + m2 + 2 + depth (see hivit_num_layers)"
            )
        return i + 1
    # Any other encoder parameter (none today) is treated like the embedding: most decayed.
    return 0


def get_hivit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 32) -> float:
    """Rule ``"itpn_d2"`` (module docstring): LR factor of parameter ``name``.

    Args:
        name: full parameter name, e.g. ``backbone.net.blocks.10.attn.qkv.weight``.
        lr_decay_rate: per-layer decay, e.g. 0.90 (base) or 0.95 (large).
        num_layers: ``len(net.blocks)``; see :func:`hivit_num_layers`.
    Returns:
        ``lr_decay_rate ** (num_layers + 1 - layer_id)``, in ``(0, 1]``.
    """
    if not 0.0 < lr_decay_rate <= 1.0:
        raise ValueError(f"lr_decay_rate must be in (0, 1], got {lr_decay_rate}")
    layer_id = _layer_id(name, num_layers)
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def _block_index(name: str, num_layers: int) -> int:
    i = name.split(".")[3]
    if not i.isdigit():
        raise ValueError(f"cannot read a block index from parameter name {name!r}")
    if int(i) >= num_layers:
        raise ValueError(
            f"parameter {name!r} is block {i} but num_layers={num_layers}: num_layers must be "
            f"len(net.blocks) = m1 + m2 + 2 + depth (see hivit_num_layers)"
        )
    return int(i)


def _check_rate(rate: float) -> None:
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"lr_decay_rate must be in (0, 1], got {rate}")


def _release_layer_id(name: str, num_layers: int, pos_embed_id: int) -> int:
    if name.startswith("backbone.net.patch_embed."):
        return 0
    if name == "backbone.net.absolute_pos_embed":
        return pos_embed_id
    if name.startswith("backbone.net.blocks."):
        return _block_index(name, num_layers) + 1
    return num_layers - 1


def release_det_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 32) -> float:
    """The release's detection factor (module docstring, ``"release_det"``); ``num_layers = len(net.blocks)``."""
    _check_rate(lr_decay_rate)
    # absolute_pos_embed falls to "anything else" in the release (it looks for ``pos_embed``)
    layer_id = _release_layer_id(name, num_layers, pos_embed_id=num_layers - 1)
    return lr_decay_rate ** (num_layers - layer_id - 1)


def release_seg_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 32) -> float:
    """The release's segmentation factor (module docstring, ``"release_seg"``)."""
    _check_rate(lr_decay_rate)
    per_layer = lr_decay_rate ** (13 / num_layers)
    layer_id = _release_layer_id(name, num_layers, pos_embed_id=0)
    return per_layer ** (num_layers - layer_id - 1)


LR_DECAY_RULES = {
    "release_det": release_det_lr_decay_rate,
    "release_seg": release_seg_lr_decay_rate,
    "itpn_d2": get_hivit_lr_decay_rate,
}


def hivit_lr_factor_func(
    *, lr_decay_rate: float, mlp_depths: Sequence[int], depth: int, rule: str
) -> Callable[[str], float]:
    """A ready ``lr_factor_func`` for a HiViT of the given block layout.

    Meant for LazyConfig, so ``num_layers`` follows the model config instead of
    being a second number to keep in sync::

        optimizer.params.lr_factor_func = L(hivit_lr_factor_func)(
            rule="release_det",
            lr_decay_rate=0.9,
            mlp_depths="${....model.backbone.net.mlp_depths}",
            depth="${....model.backbone.net.depth}",
        )

    Args:
        rule: ``"release_det"``, ``"release_seg"`` or ``"itpn_d2"`` (module docstring).
    """
    if rule not in LR_DECAY_RULES:
        raise ValueError(f"layer-decay rule {rule!r} is unknown; choose one of {sorted(LR_DECAY_RULES)}")
    _check_rate(lr_decay_rate)
    return partial(LR_DECAY_RULES[rule], lr_decay_rate=lr_decay_rate, num_layers=hivit_num_layers(mlp_depths, depth))


def _no_wd_release_det(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 1 or name.endswith(".bias") or name.endswith("_token") or name.endswith("pos_embed")


def _no_wd_release_seg(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 1 or name.endswith(".bias")


NO_WEIGHT_DECAY_RULES = {"release_det": _no_wd_release_det, "release_seg": _no_wd_release_seg}


def layer_decay_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    lr_factor_func: Callable[[str], float],
    no_weight_decay: str = "release_det",
) -> List[Dict]:
    """Optimizer param groups as the release's layer-decay constructors build them: one group per
    (lr factor, weight decay); frozen parameters left out; a parameter shared by two modules once.

    Args:
        model: the model (names as ``model.named_parameters()``).
        base_lr: ``optimizer.lr``; each group gets ``base_lr * lr_factor_func(name)``.
        weight_decay: for parameters not exempt by ``no_weight_decay``.
        no_weight_decay: ``"release_det"`` or ``"release_seg"`` (module docstring).
    Returns:
        ``[{"params": [...], "lr": float, "weight_decay": float}, ...]`` for ``torch.optim``.
    """
    if no_weight_decay not in NO_WEIGHT_DECAY_RULES:
        raise ValueError(
            f"no_weight_decay={no_weight_decay!r} is unknown; choose one of {sorted(NO_WEIGHT_DECAY_RULES)}"
        )
    exempt = NO_WEIGHT_DECAY_RULES[no_weight_decay]
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        factor = float(lr_factor_func(name))
        wd = 0.0 if exempt(name, p) else float(weight_decay)
        group = groups.setdefault((factor, wd), {"params": [], "lr": float(base_lr) * factor, "weight_decay": wd})
        group["params"].append(p)
    return list(groups.values())
