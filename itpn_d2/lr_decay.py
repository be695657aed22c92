"""Layer-wise learning-rate decay for HiViT's block sequence.

Use with detectron2's ``get_default_optimizer_params(..., lr_factor_func=...)``,
exactly like ViTDet's ``get_vit_lr_decay_rate``. ViTDet's function cannot be
reused: it assumes ``blocks.i`` is layer ``i + 1`` of a plain ViT, while HiViT's
``blocks`` is one list holding MLP blocks, a PatchMerge, MLP blocks, a PatchMerge
and the attention blocks.

Layer ids (``L = num_layers = len(net.blocks) = m1 + m2 + 2 + depth``):

==============================================  ========  ======================
parameter                                        layer id  lr factor
==============================================  ========  ======================
``backbone.net.patch_embed.*``                   0         ``rate ** (L + 1)``
``backbone.net.absolute_pos_embed``              0         ``rate ** (L + 1)``
``backbone.net.blocks.i.*`` (any block kind)     i + 1     ``rate ** (L - i)``
anything else: ``backbone.pyramid.*``,           L + 1     ``1.0``
RPN / ROI / segmentation heads, pre-training
decoder and prediction heads
==============================================  ========  ======================

So the last attention block gets exactly ``rate ** 1`` and no factor exceeds 1.
(The reference computes ``rate ** (num_layers + 2 - id - 1)`` with a
``num_layers`` two short of its block count, so its last block gets
``rate ** -1 > 1``; that is not copied.)

PatchMerge is counted as a layer of its own. It is a parametrised layer (LN +
Linear) that sits between two stages in the same list, and counting it keeps
the layer id equal to the block index in the checkpoint key, which is what a
reader checking a factor will look at. The effect of not counting it would be a
shift of the stage-1/2 factors by one or two powers of ``rate``, i.e. they would
decay slightly less; with ``rate = 0.9`` and ``L = 32`` (base, 3/3/24) the patch
embedding gets ``0.9 ** 33 = 0.031`` here versus ``0.9 ** 31 = 0.038``.

Names are matched by their ``.net.`` segment, so the same function serves
detection / segmentation (``backbone.net.*``) and pre-training models.
"""
from functools import partial
from typing import Callable, Sequence

__all__ = ["get_hivit_lr_decay_rate", "hivit_num_layers", "hivit_lr_factor_func"]


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
    """LR factor of parameter ``name`` (as given by ``named_modules`` + ``named_parameters``).

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


def hivit_lr_factor_func(*, lr_decay_rate: float, mlp_depths: Sequence[int], depth: int) -> Callable[[str], float]:
    """A ready ``lr_factor_func`` for a HiViT of the given block layout.

    Meant for LazyConfig, so ``num_layers`` follows the model config instead of
    being a second number to keep in sync::

        optimizer.params.lr_factor_func = L(hivit_lr_factor_func)(
            lr_decay_rate=0.9,
            mlp_depths="${....model.backbone.net.mlp_depths}",
            depth="${....model.backbone.net.depth}",
        )
    """
    return partial(
        get_hivit_lr_decay_rate, lr_decay_rate=lr_decay_rate, num_layers=hivit_num_layers(mlp_depths, depth)
    )
