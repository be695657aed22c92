"""ITPNSegBackbone: the iTPN backbone with the extra outputs the segmentation recipe uses.

The iTPN ADE20K recipe feeds UPerNet, at each stride, the pyramid output
concatenated with the raw encoder feature of that stride (base: 256 + 128,
256 + 256, 256 + 512, 256 + 512 channels at strides 4, 8, 16, 32), and builds
stride 32 by *max* pooling stride 16. This subclass adds the raw encoder maps as
``c2..c5`` next to ``p2..p5``; ``UPerHead(in_features=[("p2", "c2"), ...])``
concatenates them.

It is a subclass, not a wrapper: its parameters are exactly ``net.*`` and
``pyramid.*`` of ``ITPNBackbone``, so a model holding it as ``backbone`` has the
same ``backbone.net.*`` / ``backbone.pyramid.*`` keys as the pre-training model
and the detector.
"""

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from .backbone import ITPNBackbone
from .hivit import HiViT, units_to_map
from .pyramid import FeaturePyramid

__all__ = ["ITPNSegBackbone", "itpn_seg_output_shape"]

_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "c2": 4, "c3": 8, "c4": 16, "c5": 32}


@BACKBONE_REGISTRY.register()
class ITPNSegBackbone(ITPNBackbone):
    """Outputs any of ``p2..p5`` (pyramid, ``pyramid.out_dim`` channels) and
    ``c2..c5`` (encoder: C/4, C/2, C, C channels) at strides 4, 8, 16, 32.
    ``p5``/``c5`` are 2x2 max pooling of ``p4``/``c4``, as in the iTPN segmentation code.

    ``rel_pos_grid=S`` (with ``net.rel_pos=True``) gives every attention block a relative
    position bias table of ``(2S-1)^2`` entries per head, **zero-initialised**, as the release's
    segmentation backbone builds it (sunsmarterjie/iTPN ``seg/backbone/iTPN.py``: ``rpe=True``,
    ``torch.zeros((2*Hp-1)*(2*Wp-1), heads)`` with ``Hp = img_size / 16 = 32`` at 512 crops).
    A pixel pre-training checkpoint has no such table: these keys are new by design, and a
    config that sets this lists them in ``train.new_by_design_keys`` so strict loading accepts
    exactly them (``itpn_d2.checkpoint``). Starting from zero, the bias is the identity of
    attention until fine-tuning learns it.
    """

    @configurable
    def __init__(
        self,
        *,
        net: HiViT,
        pyramid: FeaturePyramid,
        out_features: Sequence[str] = ("p2", "p3", "p4", "p5", "c2", "c3", "c4", "c5"),
        square_pad: int = 0,
        rel_pos_grid: Optional[int] = None,
    ):
        unknown = [f for f in out_features if f not in _STRIDES]
        if unknown:
            raise ValueError(f"ITPNSegBackbone out_features: unknown {unknown}; choose from {list(_STRIDES)}")
        super().__init__(net=net, pyramid=pyramid, out_features=("p2", "p3", "p4"), square_pad=square_pad)
        c4, c8, c16 = net.stage_dims
        channels = {"c2": c4, "c3": c8, "c4": c16, "c5": c16}
        self._out_features = list(out_features)
        self._out_feature_strides = {f: _STRIDES[f] for f in out_features}
        self._out_feature_channels = {f: channels.get(f, pyramid.out_dim) for f in out_features}
        self._size_divisibility = max(max(self._out_feature_strides.values()), net.unit_size)
        if rel_pos_grid is not None:
            self._zero_rel_pos_tables(int(rel_pos_grid))

    def _zero_rel_pos_tables(self, grid: int) -> None:
        if not self.net.rel_pos:
            raise ValueError("ITPNSegBackbone rel_pos_grid needs net.rel_pos=True (model.backbone.net.rel_pos)")
        if grid < 1:
            raise ValueError(f"ITPNSegBackbone rel_pos_grid must be a positive grid size, got {grid}")
        m1, m2 = self.net.mlp_depths
        for blk in self.net.blocks[m1 + m2 + 2 :]:
            attn = blk.attn
            old = attn.relative_position_bias_table
            attn.rel_pos_grid = (grid, grid)
            attn.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * grid - 1) ** 2, attn.num_heads, dtype=old.dtype, device=old.device)
            )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {name: (B, C_name, H/stride, W/stride)}; H, W multiples of 32."""
        grid = (x.shape[-2] // self.net.unit_size, x.shape[-1] // self.net.unit_size)
        f4, f8, f16 = self.net(x)
        p4, p8, p16 = self.pyramid(f4, f8, f16)
        maps = {}
        want = set(self._out_features)
        if want & {"p2", "p3", "p4", "p5"}:
            maps.update(p2=units_to_map(p4, grid), p3=units_to_map(p8, grid), p4=units_to_map(p16, grid))
            maps["p5"] = F.max_pool2d(maps["p4"], kernel_size=2, stride=2)
        if want & {"c2", "c3", "c4", "c5"}:
            maps.update(
                c2=units_to_map(f4, grid),
                c3=units_to_map(f8, grid),
                c4=units_to_map(f16[:, :, None, None, :], grid),
            )
            maps["c5"] = F.max_pool2d(maps["c4"], kernel_size=2, stride=2)
        return {f: maps[f] for f in self._out_features}


def itpn_seg_output_shape(
    *, embed_dim: int, out_dim: int = 256, out_features: Sequence[str] = tuple(_STRIDES)
) -> Dict[str, ShapeSpec]:
    """``ITPNSegBackbone.output_shape()`` computed from the sizes alone, for configs
    (a LazyConfig cannot call a method of a module that is not built yet)."""
    channels = {"c2": embed_dim // 4, "c3": embed_dim // 2, "c4": embed_dim, "c5": embed_dim}
    return {f: ShapeSpec(channels=channels.get(f, out_dim), stride=_STRIDES[f]) for f in out_features}
