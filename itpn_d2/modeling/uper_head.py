"""UPerNet head (pyramid pooling + FPN fusion) for detectron2's ``SemanticSegmentor``.

Follows the head contract of detectron2's ``SemSegFPNHead``: built from
``input_shape`` (a dict of ``ShapeSpec``) plus keyword arguments, ``ignore_value``
attribute, ``forward(features, targets)`` returning ``(None, losses)`` in training
and ``(logits at stride 1, {})`` at inference; ``SemanticSegmentor`` then crops the
padding away and resizes to the requested output size.

Layout (UPerNet, Xiao et al. 2018, as used by BEiT / iTPN for ADE20K):
    levels l = 0..L-1 with strides s_0 < ... < s_{L-1}
    PPM on level L-1: avg-pool to 1x1, 2x2, 3x3, 6x6 -> 1x1 conv -> upsample -> concat with
        the input -> 3x3 conv  = top of the top-down path
    lateral 1x1 convs on levels 0..L-2, top-down addition (bilinear upsampling)
    3x3 conv on each level 0..L-2, all levels upsampled to s_0, concat -> 3x3 conv
    dropout -> 1x1 classifier                          logits (B, K, H/s_0, W/s_0)
Auxiliary FCN head (training only): 3x3 conv + 1x1 classifier on one level
(the 3rd, stride 16, as in the iTPN/BEiT recipes), loss weight 0.4.

A level may be a *group* of features that are concatenated along channels (e.g.
``("p3", "c3")``), which is how the iTPN segmentation recipe feeds each level: the
pyramid output concatenated with the raw encoder feature. A group's stride is that of
its coarsest feature; a finer one in it is first rearranged space-to-depth to that
stride (``F.pixel_unshuffle``: each k x k block of a map of C channels becomes one
position of k*k*C channels, nothing averaged away). E.g. ``("p2", "p3", "c3")`` is a
stride-8 level that still carries all of the stride-4 level, as ``make demo``'s
segmentation stage reads it: the head's convolutions stay at stride 8.

The reverse at the output (``logit_upscale=r``, off by default): the classifier gives each
position an r x r block of logits (r*r*K channels), rearranged depth-to-space
(``F.pixel_shuffle``, the sub-pixel convolution of Shi et al. 2016, "Real-Time Single Image and
Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network"), so a
stride-8 head gives stride-4 logits for the cost of a wider 1x1 classifier; bilinear
upsampling does the rest.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

__all__ = ["UPerHead"]

FeatureGroup = Union[str, Sequence[str]]


def _conv(in_ch: int, out_ch: int, k: int, norm) -> Conv2d:
    conv = Conv2d(
        in_ch,
        out_ch,
        kernel_size=k,
        padding=k // 2,
        bias=not norm,
        norm=get_norm(norm, out_ch),
        activation=F.relu,
    )
    weight_init.c2_msra_fill(conv)
    return conv


def _classifier(in_ch: int, num_classes: int) -> Conv2d:
    conv = Conv2d(in_ch, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _PPM(nn.Module):
    """Pyramid pooling: (B, C, h, w) -> (B, C + len(scales) * channels, h, w)."""

    def __init__(self, *, in_channels: int, channels: int, pool_scales: Sequence[int], norm):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.convs = nn.ModuleList([_conv(in_channels, channels, 1, norm) for _ in self.pool_scales])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for scale, conv in zip(self.pool_scales, self.convs):
            outs.append(_resize(conv(F.adaptive_avg_pool2d(x, scale)), x.shape[-2:]))
        return torch.cat(outs, dim=1)


@SEM_SEG_HEADS_REGISTRY.register()
class UPerHead(nn.Module):
    """UPerNet decode head with an optional auxiliary FCN head.

    Inputs: ``features[name]`` of shape (B, C_name, H/s, W/s) for every name in
    ``in_features``. Output logits: (B, num_classes, H, W) at inference, H, W the
    (padded) input size; in training a dict with ``loss_sem_seg`` and, if the
    auxiliary head is on, ``loss_sem_seg_aux``.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_features: Optional[Sequence[FeatureGroup]] = None,
        channels: int = 768,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: Optional[Union[str, Callable]] = "SyncBN",
        dropout: float = 0.1,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        aux_in_feature: Optional[FeatureGroup] = None,
        aux_channels: int = 256,
        aux_loss_weight: float = 0.4,
        class_weight: Optional[Sequence[float]] = None,
        logit_upscale: int = 1,
    ):
        """
        Args:
            input_shape: shapes (channels, stride) of the backbone outputs.
            num_classes: number of classes K.
            in_features: the levels, finest first; each a feature name or a tuple of
                names, concatenated at the stride of the coarsest of them (a finer one is
                rearranged space-to-depth to it, k*k times its channels for k times its
                stride; the strides must divide it). Default: every feature of
                ``input_shape`` sorted by stride.
            channels: width of all head convolutions (768 in the iTPN/BEiT recipes).
            pool_scales: output sizes of the pyramid pooling module.
            norm: normalization of every conv ("SyncBN", "BN", "GN", "LN", or None).
                "SyncBN" works on one CPU process (it falls back to plain BN).
            dropout: dropout before the classifier (both heads).
            ignore_value: target value ignored by the loss.
            loss_weight: weight of the main cross-entropy loss.
            aux_in_feature: level (name or tuple) of the auxiliary FCN head; None turns it off.
            aux_channels: width of the auxiliary conv.
            aux_loss_weight: weight of the auxiliary loss.
            class_weight: per-class weights of the cross-entropy (K values; mmseg's
                ``CrossEntropyLoss(class_weight=...)``); None: every class 1.
            logit_upscale: r, the main classifier's r x r logits per position, rearranged
                depth-to-space: logits at stride s_0 / r (r must divide s_0). 1: UPerNet's.
        """
        super().__init__()
        if in_features is None:
            in_features = sorted(input_shape, key=lambda k: input_shape[k].stride)
        if len(in_features) < 1:
            raise ValueError("UPerHead(in_features=) cannot be empty")
        self.in_features: List[Tuple[str, ...]] = [self._group(g, input_shape) for g in in_features]
        strides = [self._group_stride(g, input_shape) for g in self.in_features]
        if strides != sorted(strides):
            raise ValueError(f"UPerHead in_features must go from fine to coarse; strides {strides}")
        # {group: each feature's k, the factor from its stride to the group's (1: as it is)}
        self._unshuffle_factors: Dict[Tuple[str, ...], Tuple[int, ...]] = {}
        for g in self.in_features:
            self._unshuffle_factors[g] = self._group_factors(g, input_shape)
        in_channels = [self._group_channels(g, input_shape) for g in self.in_features]

        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        if class_weight is not None and len(class_weight) != num_classes:
            raise ValueError(f"UPerHead: class_weight has {len(class_weight)} values, num_classes is {num_classes}")
        self.register_buffer(
            "class_weight", None if class_weight is None else torch.tensor(class_weight, dtype=torch.float32),
            persistent=False,
        )
        if not isinstance(logit_upscale, int) or logit_upscale < 1 or strides[0] % logit_upscale:
            raise ValueError(
                f"UPerHead: logit_upscale={logit_upscale} must be a positive divisor of the finest stride {strides[0]}"
            )
        self.logit_upscale = logit_upscale
        # the stride of the main logits
        self.common_stride = strides[0] // logit_upscale

        self.ppm = _PPM(in_channels=in_channels[-1], channels=channels, pool_scales=pool_scales, norm=norm)
        self.ppm_bottleneck = _conv(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.ModuleList([_conv(c, channels, 1, norm) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([_conv(channels, channels, 3, norm) for _ in in_channels[:-1]])
        self.fpn_bottleneck = _conv(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = _classifier(channels, num_classes * logit_upscale * logit_upscale)

        self.aux_in_feature = None
        if aux_in_feature is not None:
            self.aux_in_feature = self._group(aux_in_feature, input_shape)
            self._unshuffle_factors[self.aux_in_feature] = self._group_factors(self.aux_in_feature, input_shape)
            aux_in = self._group_channels(self.aux_in_feature, input_shape)
            self.aux_conv = _conv(aux_in, aux_channels, 3, norm)
            self.aux_predictor = _classifier(aux_channels, num_classes)
            self.aux_loss_weight = aux_loss_weight

    @staticmethod
    def _group(g: FeatureGroup, input_shape: Dict[str, ShapeSpec]) -> Tuple[str, ...]:
        names = (g,) if isinstance(g, str) else tuple(g)
        missing = [n for n in names if n not in input_shape]
        if missing:
            raise KeyError(f"UPerHead: features {missing} not among the backbone outputs {sorted(input_shape)}")
        stride = UPerHead._group_stride(names, input_shape)
        uneven = [n for n in names if stride % input_shape[n].stride]
        if uneven:
            raise ValueError(
                f"UPerHead: features {uneven} of the level {names} cannot be brought to its stride {stride}: "
                f"strides {[input_shape[n].stride for n in names]}"
            )
        return names

    @staticmethod
    def _group_stride(names: Tuple[str, ...], input_shape: Dict[str, ShapeSpec]) -> int:
        return max(input_shape[n].stride for n in names)

    @staticmethod
    def _group_factors(names: Tuple[str, ...], input_shape: Dict[str, ShapeSpec]) -> Tuple[int, ...]:
        stride = UPerHead._group_stride(names, input_shape)
        return tuple(stride // input_shape[n].stride for n in names)

    @staticmethod
    def _group_channels(names: Tuple[str, ...], input_shape: Dict[str, ShapeSpec]) -> int:
        factors = UPerHead._group_factors(names, input_shape)
        return sum(input_shape[n].channels * k * k for n, k in zip(names, factors))

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        """yacs: MODEL.SEM_SEG_HEAD.{IN_FEATURES, NUM_CLASSES, CONVS_DIM, NORM, IGNORE_VALUE, LOSS_WEIGHT}
        and, if present, MODEL.SEM_SEG_HEAD.{AUX_IN_FEATURE, AUX_LOSS_WEIGHT, POOL_SCALES, CLASS_WEIGHT, LOGIT_UPSCALE}."""
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "in_features": head.IN_FEATURES,
            "num_classes": head.NUM_CLASSES,
            "channels": head.CONVS_DIM,
            "norm": head.NORM,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
            "pool_scales": tuple(head.get("POOL_SCALES", (1, 2, 3, 6))),
            "aux_in_feature": head.get("AUX_IN_FEATURE", None),
            "aux_loss_weight": head.get("AUX_LOSS_WEIGHT", 0.4),
            "class_weight": head.get("CLASS_WEIGHT", None),
            "logit_upscale": head.get("LOGIT_UPSCALE", 1),
        }

    def _gather(self, features: Dict[str, torch.Tensor], group: Tuple[str, ...]) -> torch.Tensor:
        xs = [
            features[n] if k == 1 else F.pixel_unshuffle(features[n], k)
            for n, k in zip(group, self._unshuffle_factors[group])
        ]
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """-> logits (B, K, H/common_stride, W/common_stride) (common_stride: s_0 / logit_upscale)."""
        xs = [self._gather(features, g) for g in self.in_features]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, xs[:-1])]
        laterals.append(self.ppm_bottleneck(self.ppm(xs[-1])))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        logits = self.predictor(self.dropout(fused))
        return logits if self.logit_upscale == 1 else F.pixel_shuffle(logits, self.logit_upscale)

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        """
        Args:
            features: backbone outputs.
            targets: (B, H, W) long class ids (``ignore_value`` for void), H, W the padded
                input size; required in training.
        Returns:
            training: (None, {"loss_sem_seg": ..., ["loss_sem_seg_aux": ...]})
            inference: ((B, K, H, W) logits at the padded input size, {})
        """
        x = self.layers(features)
        if self.training:
            if targets is None:
                raise ValueError("UPerHead needs sem_seg targets in training")
            losses = {"loss_sem_seg": self._loss(x, targets) * self.loss_weight}
            if self.aux_in_feature is not None:
                aux = self.aux_predictor(self.dropout(self.aux_conv(self._gather(features, self.aux_in_feature))))
                losses["loss_sem_seg_aux"] = self._loss(aux, targets) * self.aux_loss_weight
            return None, losses
        x = F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        return x, {}

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Upsampled in fp32: bilinear interpolation in half precision is lossy (pytorch#48163).
        logits = _resize(logits.float(), targets.shape[-2:])
        weight = None if self.class_weight is None else self.class_weight.float()  # fp32 like the logits, even in a bf16 model
        loss = F.cross_entropy(logits, targets, weight=weight, reduction="sum", ignore_index=self.ignore_value)
        # Mean over labelled pixels (weighted: over their weights, as reduction="mean" does); a crop
        # that is all void gives 0, not the NaN of reduction="mean".
        valid = targets != self.ignore_value
        if self.class_weight is None:
            return loss / valid.sum().clamp(min=1)
        return loss / weight[targets[valid]].sum().clamp(min=1e-6)
