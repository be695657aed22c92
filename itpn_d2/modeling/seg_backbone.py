"""ITPNSegBackbone: ``ITPNBackbone`` parameterised as the iTPN segmentation recipe uses it.

The iTPN ADE20K recipe feeds UPerNet, at each stride, the pyramid output
concatenated with the raw encoder feature of that stride (base: 256 + 128,
256 + 256, 256 + 512, 256 + 512 channels at strides 4, 8, 16, 32), and builds
stride 32 by *max* pooling stride 16. So the backbone outputs the encoder maps
``c2..c5`` next to ``p2..p5``; ``UPerHead(in_features=[("p2", "c2"), ...])``
concatenates them.

It is an ``ITPNBackbone`` (max pooling, one pooled level, encoder maps on), not a
wrapper: its parameters are exactly ``net.*`` and ``pyramid.*``, so a model holding
it as ``backbone`` has the same ``backbone.net.*`` / ``backbone.pyramid.*`` keys as
the pre-training model and the detector.
"""

from typing import Dict, Optional, Sequence

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from .backbone import ITPNBackbone, itpn_output_shape
from .hivit import HiViT
from .pyramid import FeaturePyramid

__all__ = ["ITPNSegBackbone", "itpn_seg_output_shape", "SEG_OUT_FEATURES"]

SEG_OUT_FEATURES = ("p2", "p3", "p4", "p5", "c2", "c3", "c4", "c5")
_SEG_MAPS = dict(pooled_levels=1, encoder_maps=True)  # the maps offered; stride 32 is max pooling


def _from_config(cfg, input_shape: ShapeSpec) -> dict:
    return ITPNBackbone.from_config(cfg, input_shape)  # yacs configs: the same net and pyramid


@BACKBONE_REGISTRY.register()
@configurable(from_config=_from_config)
def ITPNSegBackbone(
    *,
    net: HiViT,
    pyramid: FeaturePyramid,
    out_features: Sequence[str] = SEG_OUT_FEATURES,
    square_pad: int = 0,
    rel_pos_grid: Optional[int] = None,
    frozen: bool = False,
) -> ITPNBackbone:
    """The segmentation backbone: any of ``p2..p5`` (pyramid, ``pyramid.out_dim`` channels) and
    ``c2..c5`` (encoder: C/4, C/2, C, C channels) at strides 4, 8, 16, 32. ``p5``/``c5`` are
    2x2 max pooling of ``p4``/``c4``, as in the iTPN segmentation code.

    ``rel_pos_grid=S`` (with ``net.rel_pos=True``) gives every attention block a relative
    position bias table of ``(2S-1)^2`` entries per head, **zero-initialised**, as the release's
    segmentation backbone builds it (sunsmarterjie/iTPN ``seg/backbone/iTPN.py``: ``rpe=True``,
    ``torch.zeros((2*Hp-1)*(2*Wp-1), heads)`` with ``Hp = img_size / 16 = 32`` at 512 crops).
    A pixel pre-training checkpoint has no such table: these keys are new by design, and a
    config that sets this lists them in ``train.new_by_design_keys`` so strict loading accepts
    exactly them (``itpn_d2.checkpoint``). Starting from zero, the bias is the identity of
    attention until fine-tuning learns it.

    ``frozen=True``: a fixed feature extractor (``ITPNBackbone``'s ``frozen``), e.g. to train the
    UPerNet head on a detector's fine-tuned encoder and pyramid.
    """
    backbone = ITPNBackbone(
        net=net, pyramid=pyramid, out_features=out_features, square_pad=square_pad, pool="max", **_SEG_MAPS
    )
    if rel_pos_grid is not None:
        if not net.rel_pos:
            raise ValueError("ITPNSegBackbone rel_pos_grid needs net.rel_pos=True (model.backbone.net.rel_pos)")
        if int(rel_pos_grid) < 1:
            raise ValueError(f"ITPNSegBackbone rel_pos_grid must be a positive grid size, got {rel_pos_grid}")
        net.zero_rel_pos_tables(int(rel_pos_grid))
    return backbone.freeze() if frozen else backbone  # after the tables: frozen with the rest


def itpn_seg_output_shape(
    *, embed_dim: int, out_dim: int = 256, out_features: Sequence[str] = SEG_OUT_FEATURES
) -> Dict[str, ShapeSpec]:
    """``ITPNSegBackbone(...).output_shape()`` computed from the sizes alone, for configs
    (a LazyConfig cannot call a method of a module that is not built yet)."""
    return itpn_output_shape(embed_dim=embed_dim, out_dim=out_dim, out_features=out_features, **_SEG_MAPS)
