"""ITPNBackbone: HiViT + FeaturePyramid as one detectron2 ``Backbone``.

This is the single module that pre-training, detection and segmentation all hold
under the attribute ``backbone``; its state-dict keys (``net.*``, ``pyramid.*``)
are therefore identical in every checkpoint we write.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .hivit import HiViT, hivit_arch, units_to_map
from .pyramid import FeaturePyramid

__all__ = ["ITPNBackbone"]

_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


@BACKBONE_REGISTRY.register()
class ITPNBackbone(Backbone):
    """Outputs ``p2..p6`` with ``pyramid.out_dim`` channels at strides 4..64.

    p2/p3/p4 come from the pyramid; p5 and p6 are parameter-free 2x average
    pooling of p4 and p5, as in the iTPN release.
    """

    @configurable
    def __init__(
        self,
        *,
        net: HiViT,
        pyramid: FeaturePyramid,
        out_features: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
        square_pad: int = 0,
    ):
        """
        Args:
            net: the HiViT encoder.
            pyramid: the feature pyramid over ``net``'s stride 4/8/16 features.
            out_features: subset of p2..p6 to return.
            square_pad: if > 0, inputs are padded to this square size (ViTDet style).
        """
        super().__init__()
        unknown = [f for f in out_features if f not in _STRIDES]
        if unknown:
            raise ValueError(f"ITPNBackbone out_features: unknown {unknown}; choose from {list(_STRIDES)}")
        if tuple(pyramid.in_dims) != tuple(net.stage_dims):
            raise ValueError(f"pyramid.in_dims {pyramid.in_dims} do not match net.stage_dims {net.stage_dims}")
        self.net = net
        self.pyramid = pyramid
        self._out_features = list(out_features)
        self._out_feature_strides = {f: _STRIDES[f] for f in out_features}
        self._out_feature_channels = {f: pyramid.out_dim for f in out_features}
        self._square_pad = square_pad
        # p6 is p4 pooled twice: exact only if the padded input is a multiple of 64.
        self._size_divisibility = max(max(self._out_feature_strides.values()), net.unit_size)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        """For yacs configs (``MODEL.BACKBONE.NAME = "ITPNBackbone"``): reads
        ``MODEL.ITPN.{SIZE, LAYOUT, FPN_DIM, FPN_DEPTH, DROP_PATH_RATE}`` when present
        (defaults base, official, 256, 2, 0.0; depth 2 is the pre-training depth). LazyConfig users pass modules directly."""
        itpn = cfg.MODEL.get("ITPN", None) or {}
        arch = hivit_arch(itpn.get("SIZE", "base"), itpn.get("LAYOUT", "official"))
        net = HiViT(**arch, in_chans=input_shape.channels, drop_path_rate=itpn.get("DROP_PATH_RATE", 0.0))
        pyramid = FeaturePyramid(
            embed_dim=net.embed_dim, out_dim=itpn.get("FPN_DIM", 256), depth=itpn.get("FPN_DEPTH", 2)
        )
        return {"net": net, "pyramid": pyramid}

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def forward_units(self, x: torch.Tensor, ids_keep: Optional[torch.Tensor] = None):
        """The pyramid in unit layout (see ``FeaturePyramid.forward``), for pre-training."""
        return self.pyramid(*self.net(x, ids_keep))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {name: (B, D, H/stride, W/stride)}; H, W multiples of 16 (64 for p6)."""
        grid = (x.shape[-2] // self.net.unit_size, x.shape[-1] // self.net.unit_size)
        p4, p8, p16 = self.forward_units(x)
        maps = {"p2": units_to_map(p4, grid), "p3": units_to_map(p8, grid), "p4": units_to_map(p16, grid)}
        if "p5" in self._out_features or "p6" in self._out_features:
            maps["p5"] = F.avg_pool2d(maps["p4"], kernel_size=2, stride=2)
            maps["p6"] = F.avg_pool2d(maps["p5"], kernel_size=2, stride=2)
        return {f: maps[f] for f in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }
