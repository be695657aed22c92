"""ITPNBackbone: HiViT + FeaturePyramid as one detectron2 ``Backbone``.

This is the single module that pre-training, detection and segmentation all hold
under the attribute ``backbone``; its state-dict keys (``net.*``, ``pyramid.*``)
are therefore identical in every checkpoint we write. Detection and segmentation
differ only in its parameters: how the levels past the pyramid are pooled and
whether the encoder's own maps are output beside the pyramid's
(:func:`itpn_d2.modeling.seg_backbone.ITPNSegBackbone`).
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .hivit import HiViT, hivit_arch
from .levels import PYRAMID_LEVELS, UNIT_SIZE
from .pyramid import FeaturePyramid
from .unit_layout import units_to_map

__all__ = ["ITPNBackbone", "UnitFeatures", "itpn_output_shape"]

_POOLS = {"avg": F.avg_pool2d, "max": F.max_pool2d}


class UnitFeatures(NamedTuple):
    """Encoder and pyramid outputs of the (kept) units, levels in order p2, p3, p4.

    encoder: HiViT's (c2, c3, c4): (B, N, 4, 4, C/4), (B, N, 2, 2, C/2), (B, N, C).
    pyramid: (p2, p3, p4): (B, N, 4, 4, D), (B, N, 2, 2, D), (B, N, 1, 1, D), or None
        when not computed; p2 alone is None when skipped (``with_p2=False``).
    """

    encoder: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    pyramid: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _feature_table(pooled_levels: int, encoder_maps: bool) -> Dict[str, Tuple[int, Optional[str]]]:
    """{output name: (stride, the name it is pooled from, or None)}, in output order.
    Names follow detectron2: the stride-``2**i`` map of the pyramid is ``p<i>``, of the encoder ``c<i>``."""
    table = {}
    for kind in ("p", "c") if encoder_maps else ("p",):
        name = None
        for lv in PYRAMID_LEVELS:
            name = lv.name if kind == "p" else lv.encoder_name
            table[name] = (lv.stride, None)
        stride = PYRAMID_LEVELS[-1].stride
        for _ in range(pooled_levels):  # each a parameter-free 2x pooling of the level before
            stride *= 2
            pooled = f"{kind}{stride.bit_length() - 1}"
            table[pooled] = (stride, name)
            name = pooled
    return table


def itpn_output_shape(
    *,
    embed_dim: int,
    out_dim: int,
    out_features: Sequence[str],
    pooled_levels: int = 2,
    encoder_maps: bool = False,
) -> Dict[str, ShapeSpec]:
    """``ITPNBackbone.output_shape()`` from the sizes alone (a LazyConfig cannot call a method
    of a module that is not built yet). Pyramid maps ``p*`` have ``out_dim`` channels, encoder
    maps ``c2, c3, c4`` have C/4, C/2, C and the pooled ones C."""
    table = _feature_table(pooled_levels, encoder_maps)
    unknown = [f for f in out_features if f not in table]
    if unknown:
        raise ValueError(f"ITPNBackbone out_features: unknown {unknown}; choose from {list(table)}")
    encoder_dims = dict(zip((lv.stride for lv in PYRAMID_LEVELS), (embed_dim // 4, embed_dim // 2, embed_dim)))
    shapes = {}
    for f in out_features:
        stride = table[f][0]
        channels = out_dim if f.startswith("p") else encoder_dims.get(stride, embed_dim)
        shapes[f] = ShapeSpec(channels=channels, stride=stride)
    return shapes


@BACKBONE_REGISTRY.register()
class ITPNBackbone(Backbone):
    """Outputs pyramid maps ``p2..p4`` (``pyramid.out_dim`` channels, strides 4, 8, 16), levels
    past them (``p5``, ``p6``: 2x pooling of the level before), and optionally the encoder's
    maps ``c2..c4`` (C/4, C/2, C channels) with their pooled levels (``c5``...).

    Defaults are the detection backbone of the iTPN release: p2..p6, average pooling.
    """

    @configurable
    def __init__(
        self,
        *,
        net: HiViT,
        pyramid: FeaturePyramid,
        out_features: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
        square_pad: int = 0,
        pool: str = "avg",
        pooled_levels: int = 2,
        encoder_maps: bool = False,
        frozen: bool = False,
    ):
        """
        Args:
            net: the HiViT encoder.
            pyramid: the feature pyramid over ``net``'s c2/c3/c4.
            out_features: the maps to return, a subset of the names the next arguments allow.
            square_pad: if > 0, inputs are padded to this square size (ViTDet style).
            pool: ``"avg"`` or ``"max"``: the 2x pooling that makes each level past p4 (c4).
            pooled_levels: how many levels past p4 there are (2: p5, p6).
            encoder_maps: also offer the encoder's maps ``c2..`` (segmentation concatenates
                them with the pyramid's).
            frozen: a fixed feature extractor (:meth:`freeze`, one-way): no parameter of ``net``
                or ``pyramid`` trains (the optimizer's param groups and DDP leave them out), and
                both stay in eval mode (no drop path), so a training step costs the heads'
                forward and backward plus this forward (no autograd graph is built here for
                images). For training a head on features that are already fine-tuned
                (``make demo``'s UPerNet on its detector's).
        """
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"ITPNBackbone pool must be one of {list(_POOLS)}, got {pool!r}")
        if tuple(pyramid.in_dims) != tuple(net.stage_dims):
            raise ValueError(f"pyramid.in_dims {pyramid.in_dims} do not match net.stage_dims {net.stage_dims}")
        shapes = itpn_output_shape(
            embed_dim=net.embed_dim,
            out_dim=pyramid.out_dim,
            out_features=out_features,
            pooled_levels=pooled_levels,
            encoder_maps=encoder_maps,
        )
        self.net = net
        self.pyramid = pyramid
        self._pool = _POOLS[pool]
        table = _feature_table(pooled_levels, encoder_maps)
        needed = set()
        for f in out_features:
            while f is not None and f not in needed:
                needed.add(f)
                f = table[f][1]
        # (name, source) of the pooled maps to compute, each after its source
        self._pooled = [(f, src) for f, (_, src) in table.items() if src is not None and f in needed]
        self._with_pyramid = any(f.startswith("p") for f in needed)
        # A head that does not read p2 (e.g. UPerNet on p3-p5 and c3-c5) spares the pyramid's
        # stride-4 level, most of its cost; its weights stay (and load), unused. Unfrozen and under
        # DDP they get no gradient, as when p2 was computed and never reached a loss: such a run
        # needs find_unused_parameters (detectron2's create_ddp_model), frozen runs do not.
        self._with_p2 = PYRAMID_LEVELS[0].name in needed
        self._needed_maps = needed
        self._out_features = list(out_features)
        self._out_feature_strides = {f: s.stride for f, s in shapes.items()}
        self._out_feature_channels = {f: s.channels for f, s in shapes.items()}
        self._square_pad = square_pad
        # A pooled level is exact only if the padded input is a multiple of its stride.
        self._size_divisibility = max(max(self._out_feature_strides.values()), UNIT_SIZE)
        self._frozen = False
        if frozen:
            self.freeze()

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` was called (read-only: freezing is one-way)."""
        return self._frozen

    def freeze(self) -> "ITPNBackbone":
        """Make this a fixed feature extractor (the ``frozen`` argument); returns ``self``."""
        self._frozen = True
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True):
        """``nn.Module.train``; a frozen backbone stays in eval mode whatever the model's mode."""
        return super().train(mode and not self._frozen)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        """For yacs configs (``MODEL.BACKBONE.NAME = "ITPNBackbone"``): reads
        ``MODEL.ITPN.{SIZE, LAYOUT, FPN_DIM, FPN_DEPTH, DROP_PATH_RATE}`` when present
        (defaults base, official, 256, 2, 0.0; depth 2 is the pre-training depth). LazyConfig users
        pass modules directly."""
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

    def compile(self, **options) -> List[str]:
        """``torch.compile`` the encoder and the pyramid in place (``nn.Module.compile``) and
        return their names. Not this module's own ``__call__``: pre-training enters through
        :meth:`forward_units`, so only the children are on every path; in place, so the
        parameter names (and checkpoints) stay those of the eager model."""
        self.net.compile(**options)
        self.pyramid.compile(**options)
        return ["net", "pyramid"]

    def forward_units(
        self,
        x: torch.Tensor,
        ids_keep: Optional[torch.Tensor] = None,
        *,
        with_pyramid: bool = True,
        with_p2: bool = True,
    ) -> UnitFeatures:
        """Encoder and pyramid in unit layout, for pre-training and the maps of :meth:`forward`.

        Args:
            x: (B, 3, H, W), H and W multiples of 16.
            ids_keep: optional (B, N_vis) raster indices of the units to keep (see ``HiViT.forward``).
            with_pyramid: False skips the pyramid (``pyramid`` is then None).
            with_p2: False skips the pyramid's stride-4 level (``pyramid[0]`` is then None).
        """
        encoder = self.net(x, ids_keep)
        return UnitFeatures(encoder, self.pyramid(*encoder, with_p2=with_p2) if with_pyramid else None)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {name: (B, channels, H/stride, W/stride)}; H, W multiples of 16
        (of the largest stride for the pooled levels)."""
        grid = (x.shape[-2] // UNIT_SIZE, x.shape[-1] // UNIT_SIZE)
        units = self.forward_units(x, with_pyramid=self._with_pyramid, with_p2=self._with_p2)
        sources = {}
        if self._with_pyramid:
            sources.update({lv.name: p for lv, p in zip(PYRAMID_LEVELS, units.pyramid)})
        c2, c3, c4 = units.encoder
        sources.update({lv.encoder_name: c for lv, c in zip(PYRAMID_LEVELS, (c2, c3, c4[:, :, None, None, :]))})
        maps = {name: units_to_map(sources[name], grid) for name in sources if name in self._needed_maps}
        for name, source in self._pooled:
            maps[name] = self._pool(maps[source], kernel_size=2, stride=2)
        return {f: maps[f] for f in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }
