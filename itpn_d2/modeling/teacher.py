"""Teachers for masked feature modelling (MFM).

A teacher sees the FULL, unmasked image and returns one target per pyramid level
in unit layout: [(B, N, 4, 4, T), (B, N, 2, 2, T), (B, N, 1, 1, T)] for levels
p2, p3, p4 (strides 4, 8, 16). The pre-trainer gathers them at masked units.

``EMATeacher``: an exponential moving average of the online ``ITPNBackbone``.
Targets (``targets=``): ``"encoder"`` (default, the paper's) = the averaged
*encoder's* stage features of the same stride, p2 <- c2, p3 <- c3, p4 <- c4
(T = C/4, C/2, C); ``"pyramid"`` = the averaged pyramid's outputs (T = pyramid
width), kept for comparison. The paper: "MFM computes intermediate targets by
feeding the original image into a moving-averaged backbone, and uses the output
of each pyramid stage to reconstruct these targets" (Tian et al., iTPN, CVPR 2023,
Sec. 3.3). Pyramid outputs are a poor target: the absolute position embedding
enters before the attention stage and the top-down path carries it into every
level, so most of their energy is the same for every image (the pre-trainer's
``mfm_posonly_*`` meter shows it).

``ExternalTeacher``: a frozen timm ViT (e.g. a CLIP ViT) loaded from a local
weights file; its patch tokens (stride 14 or 16) are resized to each level's grid.

Both are bound to the pre-trainer with ``bind(online_backbone)`` and never
receive gradients; both stay in eval mode whatever ``.train()`` is called with.
"""
import copy
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.constants import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from .levels import PYRAMID_LEVELS, UNIT_SIZE
from .unit_layout import map_to_units

__all__ = ["EMATeacher", "ExternalTeacher", "cosine_momentum"]


def cosine_momentum(it: int, max_iter: int, start: float, end: float) -> float:
    """BYOL/DINO schedule: ``start`` at iteration 0 rising to ``end`` at ``max_iter`` (held after)."""
    if max_iter <= 0:
        return end
    t = min(max(it, 0), max_iter) / max_iter
    return end - (end - start) * (math.cos(math.pi * t) + 1.0) / 2.0


class _FrozenTeacher(nn.Module):
    def train(self, mode: bool = True):
        # Teachers are always in inference mode: no drop path, no dropout.
        super().train(mode)
        for m in self.children():
            m.eval()
        return self

    def bind(self, online: nn.Module) -> None:
        pass

    def _freeze(self, module: nn.Module) -> None:
        module.requires_grad_(False)
        module.eval()


class EMATeacher(_FrozenTeacher):
    """EMA of the online backbone: ``teacher = m * teacher + (1 - m) * online`` per step.

    ``m`` follows :func:`cosine_momentum` from ``momentum`` to ``end_momentum`` over
    ``max_iter`` iterations. The pre-trainer calls :meth:`update` at the start of each
    training forward with detectron2's event-storage iteration, so no trainer hook is
    needed and stock ``tools/lazyconfig_train_net.py`` works; the averaged weights
    live in the model's state dict (``teacher.model.*``), so ``--resume`` restores them.
    """

    TARGETS = ("encoder", "pyramid")

    def __init__(
        self, *, momentum: float = 0.996, end_momentum: float = 1.0, max_iter: int = 0, targets: str = "encoder"
    ):
        """
        Args:
            momentum: momentum at iteration 0.
            end_momentum: momentum at ``max_iter`` (cosine in between).
            max_iter: schedule length (the training length); 0 keeps ``momentum`` constant.
            targets: ``"encoder"`` (c2, c3, c4 of the averaged HiViT) or ``"pyramid"``
                (p2, p3, p4 of the averaged pyramid); see the module docstring.
        """
        super().__init__()
        if not (0.0 <= momentum <= 1.0 and 0.0 <= end_momentum <= 1.0):
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum} -> {end_momentum}")
        if targets not in self.TARGETS:
            raise ValueError(f"EMATeacher.targets must be one of {self.TARGETS}, got {targets!r}")
        self.targets = targets
        self.momentum = momentum
        self.end_momentum = end_momentum
        self.max_iter = max_iter
        self.model: Optional[nn.Module] = None
        self.last_momentum: Optional[float] = None

    def bind(self, online: nn.Module) -> None:
        """Make the teacher a frozen deep copy of ``online`` (an ``ITPNBackbone``)."""
        self.model = copy.deepcopy(online)
        self._freeze(self.model)

    def compile(self, **options) -> List[str]:
        """Compile the averaged backbone's encoder and pyramid in place (``ITPNBackbone.compile``);
        returns their names under this module."""
        return ["model." + name for name in self.model.compile(**options)]

    @property
    def out_dims(self) -> Tuple[int, int, int]:
        """Target width per level (p2, p3, p4)."""
        if self.targets == "pyramid":
            return (self.model.pyramid.out_dim,) * 3
        return tuple(int(d) for d in self.model.net.stage_dims)

    def momentum_at(self, it: int) -> float:
        if self.max_iter <= 0:
            return self.momentum
        return cosine_momentum(it, self.max_iter, self.momentum, self.end_momentum)

    @torch.no_grad()
    def update(self, online: nn.Module, *, momentum: float) -> None:
        """``t = m * t + (1 - m) * o`` for every parameter; buffers are copied."""
        if self.model is None:
            raise RuntimeError("EMATeacher.update before bind(online)")
        t_params = list(self.model.parameters())
        o_params = [p.detach() for p in online.parameters()]
        if len(t_params) != len(o_params):
            raise RuntimeError("EMATeacher: teacher and online models have different parameters")
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)
        for tb, ob in zip(self.model.buffers(), online.buffers()):
            tb.copy_(ob)
        self.last_momentum = momentum

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """images: (B, 3, H, W) normalised as the student's input -> per level (p2, p3, p4), unit layout:
        encoder targets [(B, N, 4, 4, C/4), (B, N, 2, 2, C/2), (B, N, 1, 1, C)];
        pyramid targets [(B, N, 4, 4, D), (B, N, 2, 2, D), (B, N, 1, 1, D)]."""
        units = self.model.forward_units(images, with_pyramid=self.targets == "pyramid")
        if self.targets == "pyramid":
            return list(units.pyramid)
        c2, c3, c4 = units.encoder
        return [c2, c3, c4[:, :, None, None, :]]


class ExternalTeacher(_FrozenTeacher):
    """A frozen timm ViT (e.g. ``vit_base_patch16_clip_224``) from a local weights file.

    Nothing is downloaded: the model is built with ``pretrained=False`` and the file
    at ``weights`` is loaded strictly (timm's ViT checkpoint filter first, so OpenAI
    CLIP / open_clip visual checkpoints convert). Input: the student's normalised
    pixels are mapped back to [0, 1] with the student's mean/std and re-normalised
    with the teacher's own ``mean``/``std`` (not the release's ``(x+1)*127.5/255``
    squashing). The patch-token map is resized bilinearly to each level's grid.
    """

    def __init__(
        self,
        *,
        model_name: str,
        weights: str,
        student_pixel_mean: Sequence[float],
        student_pixel_std: Sequence[float],
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        project: bool = False,
        model_kwargs: Optional[Dict] = None,
        config_key: str = "model.teacher.weights",
    ):
        """
        Args:
            model_name: a timm ViT name.
            weights: local path of its weights (``.pth``/``.bin``/``.safetensors``).
            student_pixel_mean, student_pixel_std: the pre-trainer's 0-255 RGB normalisation.
            mean, std: the teacher's [0, 1] normalisation; None reads timm's pretrained_cfg.
            project: apply the model's linear ``head`` to every patch token (CLIP's
                ``ln_post @ proj`` target, as iTPN's CLIP variant uses).
            model_kwargs: extra ``timm.create_model`` arguments.
            config_key: named in the error when ``weights`` is missing.
        """
        super().__init__()
        if not weights or not os.path.isfile(weights):
            raise FileNotFoundError(
                f"ExternalTeacher: weights file {weights!r} not found (set `{config_key}` to a local file; "
                "nothing is downloaded at run time)"
            )
        import timm

        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("dynamic_img_size", True)
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        state = _load_state(weights)
        try:
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, model)
        except Exception:  # not a ViT-family checkpoint layout: load as is
            pass
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                f"ExternalTeacher: {weights} does not match timm model {model_name!r}: "
                f"missing {result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}"
            )
        self.model = model
        self._freeze(self.model)
        self.project = project
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = mean if mean is not None else cfg.get("mean", tuple(v / 255 for v in IMAGENET_PIXEL_MEAN))
        std = std if std is not None else cfg.get("std", tuple(v / 255 for v in IMAGENET_PIXEL_STD))
        self.register_buffer("s_mean", torch.tensor(student_pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("s_std", torch.tensor(student_pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("t_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("t_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)
        ps = model.patch_embed.patch_size
        self.patch = (ps, ps) if isinstance(ps, int) else tuple(ps)

    def compile(self, **options) -> List[str]:
        """Nothing is compiled: the timm model is entered through ``forward_features``, which
        compiling its ``__call__`` would not reach."""
        return []

    @property
    def out_dims(self) -> Tuple[int, int, int]:
        """Target width per level (p2, p3, p4): the same feature map resized to each stride."""
        return (self.out_dim,) * 3

    @property
    def out_dim(self) -> int:
        if self.project and isinstance(getattr(self.model, "head", None), nn.Linear):
            return self.model.head.out_features
        return self.model.embed_dim

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised (B, 3, H, W) -> teacher-normalised, sides rounded up to the patch size."""
        x01 = (images * self.s_std + self.s_mean) / 255.0
        x = (x01 - self.t_mean) / self.t_std
        H, W = x.shape[-2:]
        ph, pw = self.patch
        size = (math.ceil(H / ph) * ph, math.ceil(W / pw) * pw)
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """images: (B, 3, H, W) student-normalised -> [(B,N,4,4,T), (B,N,2,2,T), (B,N,1,1,T)]."""
        x = self.teacher_input(images)
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens :]
        if self.project and isinstance(getattr(self.model, "head", None), nn.Linear):
            tokens = self.model.head(tokens)
        B, L, T = tokens.shape
        th, tw = x.shape[-2] // self.patch[0], x.shape[-1] // self.patch[1]
        if th * tw != L:
            raise RuntimeError(f"ExternalTeacher: {L} patch tokens do not form a {th}x{tw} grid")
        fmap = tokens.transpose(1, 2).reshape(B, T, th, tw).float()
        gh, gw = images.shape[-2] // UNIT_SIZE, images.shape[-1] // UNIT_SIZE
        outs = []
        for lv in PYRAMID_LEVELS:
            k = lv.tokens_per_unit_side
            m = F.interpolate(fmap, size=(gh * k, gw * k), mode="bilinear", align_corners=False)
            outs.append(map_to_units(m, k))
        return outs


def _load_state(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    # imported here: itpn_d2.checkpoint imports the modeling package
    from ..checkpoint import extract_state_dict

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):  # a TorchScript CLIP model
        obj = obj.state_dict()
    return extract_state_dict(obj, path)
