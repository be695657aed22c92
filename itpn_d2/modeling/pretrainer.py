"""MaskedPretrainer: iTPN's integral pre-training (MIM + MFM) as a detectron2 meta-architecture.

The model holds the detector's very backbone class under ``backbone`` (HiViT ``net``
+ ``pyramid``); everything only pre-training needs sits beside it:

    backbone        ITPNBackbone     -> keys ``backbone.net.*``, ``backbone.pyramid.*`` (= the detector's)
    pixel_decoder   PixelDecoder (fused, the release's) or LevelDecoder (per-level pixels) or None
    mfm_decoder     LevelDecoder predicting teacher features per level, or None
    teacher         EMATeacher / ExternalTeacher, or None

One training step:
    1. images (0-255 RGB) -> normalised; units masked by ``mask_generator`` (exact,
       equal counts per sample); masked units are DROPPED before HiViT's first block.
    2. the backbone gives the visible units' pyramid (p2, p3, p4 in unit layout).
    3. MIM: the pixel decoder predicts every unit; loss on masked units only
       (normalised pixels per unit, or per level token in per-level mode).
    4. MFM: the teacher (full image, no grad) gives per-level targets (by default the EMA
       encoder's c2/c3/c4 for p2/p3/p4); each (position, channel) is standardised over the
       images of the batch, which removes what is the same for every image, then each token
       by a non-affine LayerNorm; the MFM decoder predicts them; loss on masked units only.
       Beside each ``loss_mfm_*`` the meter ``mfm_posonly_*`` (the loss of the best
       image-independent prediction) goes to the event storage, never into the loss.

No leak: the only path from the pixels of a masked unit into the student is through
its own tokens, which are dropped before the first block, so nothing of a masked
unit reaches any visible feature or any student prediction (the tests check it).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage

from .backbone import ITPNBackbone
from .decoder import LevelDecoder, PixelDecoder
from .levels import LEVEL_NAMES, PYRAMID_LEVELS, UNIT_SIZE
from .masking import mask_from_seed, num_masked_units
from .teacher import EMATeacher
from .unit_layout import denormalize_unit_predictions, patchify_units, unpatchify_units

__all__ = ["MaskedPretrainer", "norm_targets", "norm_over_batch"]


def _current_storage():
    try:
        return get_event_storage()
    except AssertionError:  # no EventStorage active (plain scripts, tests)
        return None


def norm_targets(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token normalisation over the last dim: ``(t - mean) / sqrt(var + eps)``
    (MAE's norm-pix loss; for features, a non-affine LayerNorm)."""
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True, unbiased=False)
    return (t - mean) / (var + eps) ** 0.5


def norm_over_batch(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise every (position, channel) over the images of the batch (dim 0):
    ``(t - mean_B) / sqrt(var_B + eps)``. What every image shares at a position (the
    position embedding's imprint) becomes 0, so only what differs between images is left
    to predict. With several training processes the statistics are those of the global
    batch (one all-reduce of the sums), so 1 x 2B and 2 x B processes give the same targets.

    t: (B, ...) -> same shape; B (global) must be at least 2.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    n = t.shape[0] * (dist.get_world_size() if distributed else 1)  # equal per-process batches (detectron2's)
    if n < 2:
        raise ValueError(
            "MaskedPretrainer: mfm_target_norm='batch_token' standardises teacher targets over the images "
            f"of the batch and needs at least 2 images, got {n} (use a larger batch or mfm_target_norm='token')"
        )
    # two passes (mean, then the mean square about it): E[x^2] - E[x]^2 cancels badly when the
    # shared part is large, which is the very case here
    s1 = t.sum(0)
    if distributed:
        dist.all_reduce(s1)
    centred = t - s1 / n
    s2 = centred.pow(2).sum(0)
    if distributed:
        dist.all_reduce(s2)
    return centred / (s2 / n + eps) ** 0.5


MFM_TARGET_NORMS = ("batch_token", "token")


@META_ARCH_REGISTRY.register()
class MaskedPretrainer(nn.Module):
    """Masked image modelling (pixels) + masked feature modelling (teacher features)."""

    def __init__(
        self,
        *,
        backbone: ITPNBackbone,
        mask_generator,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        pixel_decoder: Optional[Union[PixelDecoder, LevelDecoder]] = None,
        mfm_decoder: Optional[LevelDecoder] = None,
        teacher: Optional[nn.Module] = None,
        mask_ratio: float = 0.75,
        mim_weights: Union[float, Sequence[float]] = 1.0,
        mfm_weights: Sequence[float] = (1.0, 1.0, 1.0),
        norm_pix_loss: bool = True,
        mfm_loss: str = "smooth_l1",
        mfm_target_norm: str = "batch_token",
        mfm_warmup_iters: int = 0,
        use_pyramid: bool = True,
        eval_mask_seed: int = 0,
    ):
        """
        Args:
            backbone: the ITPNBackbone being pre-trained (kept as ``self.backbone``).
            mask_generator: ``RandomMaskGenerator()`` or ``BlockMaskGenerator(...)``.
            pixel_mean, pixel_std: 0-255 RGB normalisation of the input (3 values each).
            pixel_decoder: None (no MIM), a ``PixelDecoder`` (one fused loss ``loss_mim``)
                or a ``LevelDecoder`` with ``out_dims = (4*4*3, 8*8*3, 16*16*3)``
                (per-level losses ``loss_mim_p2/p3/p4``).
            mfm_decoder: None (no MFM) or a ``LevelDecoder`` with ``out_dims`` all equal
                to the teacher's width; losses ``loss_mfm_p2/p3/p4``.
            teacher: ``EMATeacher`` (bound here to a copy of ``backbone``) or
                ``ExternalTeacher``; required with ``mfm_decoder``.
            mask_ratio: fraction of units masked (exact count per sample).
            mim_weights: a float for the fused decoder; 3 floats (p2, p3, p4) per level.
            mfm_weights: 3 floats (p2, p3, p4); a 0 weight skips that level.
            norm_pix_loss: normalise pixel targets per unit (fused) / per token (per level).
            mfm_loss: "smooth_l1" (beta 1, as the iTPN CLIP variant) or "mse".
            mfm_target_norm: "batch_token" (each (position, channel) standardised over the
                images of the batch, then each token by a non-affine LayerNorm) or "token"
                (LayerNorm only, the earlier targets: most of an EMA pyramid target is then
                the same for every image).
            mfm_warmup_iters: the MFM weights rise linearly from 0 to ``mfm_weights`` over
                this many iterations (0: full weight from the start).
            use_pyramid: False pre-trains the encoder alone (the paper's backbone-only
                baseline): the pixel decoder reads the encoder's stride-16 output
                (``PixelDecoder(levels=(16,), in_dim=C)``), the pyramid is frozen and unused
                (its random weights stay in the checkpoint; fine-tune with
                ``train.backbone_load=encoder_only`` for a fresh pyramid). Needs no MFM and a
                fused pixel decoder.
            eval_mask_seed: seed of the masks drawn in eval mode (reproducible figures).
        """
        super().__init__()
        if pixel_decoder is None and mfm_decoder is None:
            raise ValueError("MaskedPretrainer needs a pixel_decoder, an mfm_decoder, or both")
        if (mfm_decoder is None) != (teacher is None):
            raise ValueError("MaskedPretrainer: mfm_decoder and teacher go together (both set or both None)")
        if mfm_loss not in ("smooth_l1", "mse"):
            raise ValueError(f"MaskedPretrainer.mfm_loss must be 'smooth_l1' or 'mse', got {mfm_loss!r}")
        if mfm_target_norm not in MFM_TARGET_NORMS:
            raise ValueError(
                f"MaskedPretrainer.mfm_target_norm must be one of {MFM_TARGET_NORMS}, got {mfm_target_norm!r}"
            )
        if mfm_warmup_iters < 0:
            raise ValueError(f"MaskedPretrainer.mfm_warmup_iters must be >= 0, got {mfm_warmup_iters}")
        if getattr(backbone, "frozen", False):
            raise ValueError(
                "MaskedPretrainer: the backbone is frozen (model.backbone.frozen=True), so pre-training would "
                "train nothing of it; a frozen backbone is for training heads on fine-tuned features"
            )
        if not use_pyramid:
            if mfm_decoder is not None:
                raise ValueError("MaskedPretrainer: use_pyramid=False (backbone only) cannot have an mfm_decoder")
            top_stride_only = (PYRAMID_LEVELS[-1].stride,)
            if not isinstance(pixel_decoder, PixelDecoder) or tuple(pixel_decoder.levels) != top_stride_only:
                raise ValueError(
                    "MaskedPretrainer: use_pyramid=False needs pixel_decoder=PixelDecoder(levels=(16,), "
                    "in_dim=<encoder width>), which reads the encoder's stride-16 output"
                )
            # Frozen: no gradients, so DDP finds no unused parameter and the optimizer skips them.
            backbone.pyramid.requires_grad_(False)
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.mfm_decoder = mfm_decoder
        self.teacher = teacher
        self.mask_generator = mask_generator
        self.mask_ratio = mask_ratio
        self.unit_size = UNIT_SIZE
        self.norm_pix_loss = norm_pix_loss
        self.mfm_loss = mfm_loss
        self.mfm_target_norm = mfm_target_norm
        self.mfm_warmup_iters = int(mfm_warmup_iters)
        self.use_pyramid = bool(use_pyramid)
        self.eval_mask_seed = eval_mask_seed
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

        self.per_level_mim = isinstance(pixel_decoder, LevelDecoder)
        if self.per_level_mim:
            want = tuple((lv.stride * lv.stride * 3) for lv in PYRAMID_LEVELS)
            if tuple(pixel_decoder.out_dims) != want:
                raise ValueError(f"per-level pixel_decoder.out_dims must be {want}, got {pixel_decoder.out_dims}")
            # LazyConfig hands lists over as ListConfig: test for a number, not for list/tuple.
            scalar = isinstance(mim_weights, (int, float))
            mim_weights = (float(mim_weights),) * 3 if scalar else tuple(float(w) for w in mim_weights)
            if len(mim_weights) != 3:
                raise ValueError(f"mim_weights for a per-level decoder needs 3 values, got {mim_weights}")
        elif pixel_decoder is not None and not isinstance(mim_weights, (int, float)):
            raise ValueError(f"mim_weights for the fused PixelDecoder is one float, got {mim_weights}")
        self.mim_weights = mim_weights
        if len(mfm_weights) != 3:
            raise ValueError(f"mfm_weights needs 3 values (p2, p3, p4), got {mfm_weights}")
        self.mfm_weights = tuple(float(w) for w in mfm_weights)
        if mfm_decoder is not None:
            self._freeze_zero_weight_levels(mfm_decoder)

        if teacher is not None:
            teacher.bind(self.backbone)
            if tuple(mfm_decoder.out_dims) != tuple(teacher.out_dims):
                raise ValueError(
                    f"mfm_decoder.out_dims {tuple(mfm_decoder.out_dims)} must equal the teacher's width per level "
                    f"(p2, p3, p4) {tuple(teacher.out_dims)}"
                )
        self._local_iter = 0  # used only when no EventStorage is active
        self._ema_iter = -1  # the iteration of the last EMA teacher update
        # The mfm_posonly_* meter costs a device-to-host read (and an all-reduce): logged every
        # this many iterations; the trainer sets it to train.log_period.
        self.metrics_period = 1

    def _freeze_zero_weight_levels(self, mfm_decoder) -> None:
        """A 0 in ``mfm_weights`` skips that level's loss, so the level's output head (its norm
        and prediction layer) would get no gradient: DDP with ``find_unused_parameters=False``
        then fails at the next iteration ("Expected to have finished reduction in the prior
        iteration"). Those parameters are frozen instead (DDP and the optimizer skip them; the
        checkpoint keeps them). All levels at 0: the whole decoder is frozen."""
        if all(w == 0 for w in self.mfm_weights):
            mfm_decoder.requires_grad_(False)
            return
        for i, w in enumerate(self.mfm_weights):
            if w != 0:
                continue
            for part in ("decoder_norm", "decoder_pred"):
                heads = getattr(mfm_decoder, part, None)
                if heads is not None:
                    heads[i].requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """Stack the (3, H, W) 0-255 RGB ``image`` fields into a normalised (B, 3, H, W) batch."""
        images = [d["image"] for d in batched_inputs]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"MaskedPretrainer: all images of a batch must have one size, got {sorted(shapes)}")
        (shape,) = shapes
        if len(shape) != 3 or shape[0] != 3 or shape[1] % self.unit_size or shape[2] % self.unit_size:
            raise ValueError(
                f"MaskedPretrainer: 'image' must be (3, H, W) with H, W multiples of {self.unit_size}, got {shape}"
            )
        x = self._stack_to_device(images).float()  # uint8 from the mapper: 4x less to copy
        return (x - self.pixel_mean) / self.pixel_std

    def _stack_to_device(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``torch.stack(tensors)`` on the model's device with ONE host-to-device copy: on CUDA the
        host tensors are stacked into a pinned buffer (torch's caching host allocator reuses it),
        so the copy is asynchronous; a per-tensor ``non_blocking`` copy from pageable memory is not."""
        if self.device.type == "cuda" and all(t.device.type == "cpu" for t in tensors):
            t0 = tensors[0]
            buf = torch.empty((len(tensors), *t0.shape), dtype=t0.dtype, pin_memory=True)
            torch.stack(list(tensors), out=buf)
            return buf.to(self.device, non_blocking=True)
        return torch.stack([t.to(self.device) for t in tensors])

    def masks_of(self, batched_inputs: List[Dict], grid) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(ids_keep (B, N_vis), mask (B, N)) on the model's device from the samples' own masks
        (``"mask"`` and ``"ids_keep"``, drawn in the DataLoader workers from each sample's seed by
        :func:`itpn_d2.data.resumable.attach_mask_generator`), or from their ``"mask_seed"``s;
        None when the samples carry neither."""
        n = grid[0] * grid[1]
        if all("mask" in d and "ids_keep" in d for d in batched_inputs):
            for d in batched_inputs:
                if d["mask"].numel() != n:
                    raise ValueError(
                        f"MaskedPretrainer: a sample's 'mask' has {d['mask'].numel()} units, its image {n} "
                        f"({grid[0]}x{grid[1]}): the loader's mask unit differs from the model's ({self.unit_size})"
                    )
            return (
                self._stack_to_device([d["ids_keep"] for d in batched_inputs]),
                self._stack_to_device([d["mask"].reshape(n) for d in batched_inputs]),
            )
        seeds = [d.get("mask_seed") for d in batched_inputs]
        if all(s is not None for s in seeds):
            return self.make_mask_from_seeds(seeds, grid)
        return None

    def make_mask(self, batch_size: int, grid, generator: Optional[torch.Generator] = None):
        """(ids_keep (B, N_vis), mask (B, N) bool True = masked) from the mask generator."""
        return self.mask_generator(batch_size, grid, self.mask_ratio, device=self.device, generator=generator)

    def make_mask_from_seeds(self, seeds: Sequence[int], grid):
        """One mask per sample, each drawn from a CPU generator seeded by that sample's seed.

        The mask of a sample then depends on nothing but its seed: not on the batch it is in,
        the process (rank) that holds it, the DataLoader worker, or the global RNG. With
        :func:`itpn_d2.data.build_resumable_train_loader` the seed is a function of the
        sample's global position, so 1 x 2B and 2 x B processes, and resumed runs, mask alike.
        Returns (ids_keep (B, N_vis), mask (B, N)) as :meth:`make_mask`.
        """
        keeps, masks = [], []
        for s in seeds:  # drawn on the CPU, moved to the model's device once
            k, m = mask_from_seed(self.mask_generator, grid, self.mask_ratio, s)
            keeps.append(k)
            masks.append(m)
        return self._stack_to_device(keeps), self._stack_to_device(masks)

    def predict(self, images: torch.Tensor, ids_keep: torch.Tensor) -> Dict[str, object]:
        """The student alone, for a given mask.

        Args:
            images: (B, 3, H, W) normalised.
            ids_keep: (B, N_vis) kept unit indices (sorted raster order).
        Returns a dict:
            "encoder": (c2, c3, c4) HiViT outputs of the kept units,
            "pyramid": (p2, p3, p4) pyramid of the kept units ((None, None, c4) with
                ``use_pyramid=False``),
            "mim": (B, N, 768) fused pixel prediction, or [p2, p3, p4] per-level predictions
                (B, N, k, k, s*s*3), or None,
            "mfm": [p2, p3, p4] (B, N, k, k, T) teacher-feature predictions, or None.
        """
        grid = (images.shape[-2] // self.unit_size, images.shape[-1] // self.unit_size)
        enc, pyr = self.backbone.forward_units(images, ids_keep, with_pyramid=self.use_pyramid)
        if not self.use_pyramid:  # backbone only: the decoder reads c4 (PixelDecoder(levels=(16,)))
            pyr = (None, None, enc[2][:, :, None, None, :])
        mim = self.pixel_decoder(pyr, ids_keep, grid) if self.pixel_decoder is not None else None
        mfm = self.mfm_decoder(pyr, ids_keep, grid) if self.mfm_decoder is not None else None
        return {"encoder": enc, "pyramid": pyr, "mim": mim, "mfm": mfm}

    def pixel_targets(self, images: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Fused: (B, N, 768); per level: [(B, N, 4, 4, 48), (B, N, 2, 2, 192), (B, N, 1, 1, 768)]."""
        if self.per_level_mim:
            ts = [patchify_units(images, self.unit_size, lv.tokens_per_unit_side) for lv in PYRAMID_LEVELS]
            return [norm_targets(t) for t in ts] if self.norm_pix_loss else ts
        t = patchify_units(images, self.unit_size, 1).flatten(1, 3)
        return norm_targets(t) if self.norm_pix_loss else t

    def unit_losses(
        self, images: torch.Tensor, out: Dict[str, object], teacher_targets=None
    ) -> Dict[str, torch.Tensor]:
        """Per-unit loss maps (B, N) for every active term (before masking and weighting):
        "mim" (fused) or "mim_p2".."mim_p4", and "mfm_p2".."mfm_p4"."""
        maps = {}
        if out["mim"] is not None:
            tgt = self.pixel_targets(images)
            if self.per_level_mim:
                for name, p, t in zip(LEVEL_NAMES, out["mim"], tgt):
                    maps[f"mim_{name}"] = (p.float() - t).pow(2).mean(dim=(2, 3, 4))
            else:
                maps["mim"] = (out["mim"].float() - tgt).pow(2).mean(dim=-1)
        if out["mfm"] is not None and teacher_targets is not None:
            maps.update(self.mfm_unit_losses(out["mfm"], teacher_targets)[0])
        return maps

    def mfm_targets(self, teacher_targets: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Teacher outputs [(B, N, k, k, T_l)] -> the normalised MFM targets (same shapes, fp32)."""
        outs = []
        for t in teacher_targets:
            t = t.float()
            if self.mfm_target_norm == "batch_token":
                t = norm_over_batch(t)
            outs.append(norm_targets(t))
        return outs

    def _mfm_err(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.mfm_loss == "mse":
            return F.mse_loss(p, t, reduction="none")
        return F.smooth_l1_loss(p, t, reduction="none", beta=1.0)

    def mfm_unit_losses(self, preds: Sequence[torch.Tensor], teacher_targets: Sequence[torch.Tensor]):
        """Per-unit MFM loss maps and position-only meter maps, both {"mfm_p2".."mfm_p4": (B, N)}
        for the levels with non-zero weight.

        The meter is the loss of the best prediction that ignores the image: at every
        (position, sub-token, channel), the batch mean of the target (what the least-squares
        fit of a per-position constant gives). An MFM loss near it means the decoder has learnt
        nothing about the image; the further below, the more image information it carries.
        """
        maps, posonly = {}, {}
        targets = self.mfm_targets(teacher_targets)
        for i, (name, p, t) in enumerate(zip(LEVEL_NAMES, preds, targets)):
            if self.mfm_weights[i] == 0:
                continue
            maps[f"mfm_{name}"] = self._mfm_err(p.float(), t).mean(dim=(2, 3, 4))
            with torch.no_grad():
                const = t.mean(dim=0, keepdim=True).expand_as(t)
                posonly[f"mfm_{name}"] = self._mfm_err(const, t).mean(dim=(2, 3, 4))
        return maps, posonly

    def mfm_weight_factor(self, it: int) -> float:
        """The MFM warm-up: linear from 0 at iteration 0 to 1 at ``mfm_warmup_iters``."""
        if self.mfm_warmup_iters <= 0:
            return 1.0
        return min(1.0, max(it, 0) / self.mfm_warmup_iters)

    def _iteration(self) -> int:
        storage = _current_storage()
        return storage.iter if storage is not None else self._local_iter

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts (detectron2's format), each with
                "image": (3, H, W) uint8 (the mapper's) or float tensor, 0-255 RGB, H and W
                multiples of 16, all of one size, on the host (stacked into one pinned
                buffer and copied to the device once) or on the device (a "skipped_images"
                field is logged by the training hook
                ``itpn_d2.engine.skipped_images.SkippedImagesMetric``, not here);
                optional "ids_keep" (N_vis,) long and "mask" (N,) bool: the sample's mask,
                drawn in the DataLoader worker (:meth:`masks_of`); else optional
                "mask_seed": int; when every sample has one, each sample's mask is drawn
                from it (:meth:`make_mask_from_seeds`), else from the global RNG.

        Returns:
            training: dict of scalar loss tensors only (detectron2 sums all values):
                ``loss_mim`` (fused) or ``loss_mim_p2/p3/p4`` (per level), and
                ``loss_mfm_p2/p3/p4`` (levels with non-zero weight). Each is the
                weighted mean over masked units (MFM weights times the warm-up factor).
                ``mask_ratio``, ``ema_momentum`` and the position-only meter
                ``mfm_posonly_p2/p3/p4`` (same weights; every ``metrics_period`` iterations)
                go to the active EventStorage only: logged, but neither summed into the
                loss nor differentiated. (``skipped_images`` is logged by the trainer hook.)
            eval: dict of tensors for the reconstruction visualiser (masks are drawn
                with a CPU generator seeded by ``eval_mask_seed``, so repeated calls agree):
                "image": (B, 3, H, W) the input, 0-255 RGB (float);
                "mask": (B, H/16, W/16) bool, True = masked unit;
                "target": (B, 3, H, W) what the loss compares to, as an image in 0-255 RGB
                    (with norm-pix loss each unit is normalised, then mapped back with the
                    unit's own mean/std, i.e. equal to "image");
                "pred_pixels": (B, 3, H, W) the reconstruction of EVERY unit in 0-255 RGB
                    (with norm-pix loss, de-normalised with each unit's mean/std of the
                    original image, as MAE's visualisation does); per-level decoders use the
                    finest level (p2); absent without a pixel decoder;
                "pred_pixels_levels": {"p2","p3","p4": (B, 3, H, W)} per-level mode only.
        """
        images = self.preprocess_image(batched_inputs)
        B, _, H, W = images.shape
        grid = (H // self.unit_size, W // self.unit_size)
        if not self.training:
            return self.reconstruct(images)

        it = self._iteration()
        given = self.masks_of(batched_inputs, grid)
        ids_keep, mask = given if given is not None else self.make_mask(B, grid)
        teacher_targets = None
        momentum = None
        if self.teacher is not None:
            if isinstance(self.teacher, EMATeacher):
                momentum = self.teacher.momentum_at(it)
                # once per iteration: with gradient accumulation forward runs k times per
                # optimizer step, and the student has not moved in between
                if it != self._ema_iter:
                    self.teacher.update(self.backbone, momentum=momentum)
                    self._ema_iter = it
            teacher_targets = self.teacher(images)
        out = self.predict(images, ids_keep)
        maps = self.unit_losses(images, out)
        posonly = {}
        if teacher_targets is not None:
            mfm_maps, posonly = self.mfm_unit_losses(out["mfm"], teacher_targets)
            maps.update(mfm_maps)

        m = mask.float()
        denom = m.sum().clamp(min=1.0)
        mfm_factor = self.mfm_weight_factor(it)
        losses = {}
        meter = {}
        for name, lmap in maps.items():
            if name == "mim":
                w = float(self.mim_weights)
            elif name.startswith("mim_"):
                w = self.mim_weights[LEVEL_NAMES.index(name[4:])]
            else:
                w = self.mfm_weights[LEVEL_NAMES.index(name[4:])] * mfm_factor
                # the meter on the loss's own scale (same weight, same masked units)
                meter[f"mfm_posonly_{name[4:]}"] = w * (posonly[name] * m).sum() / denom
            losses[f"loss_{name}"] = w * (lmap * m).sum() / denom

        self._local_iter += 1
        storage = _current_storage()
        if storage is not None:
            # every generator masks exactly this many units per sample: a host number, no device sync
            n = grid[0] * grid[1]
            scalars = {"mask_ratio": num_masked_units(n, self.mask_ratio) / n}
            if momentum is not None:
                scalars["ema_momentum"] = momentum
            storage.put_scalars(**scalars, smoothing_hint=False)
        if storage is not None and meter and (it + 1) % max(1, self.metrics_period) == 0:
            # Not returned: detectron2's trainer sums every returned value into the loss. Logged
            # like the losses (all-process mean, smoothed over the logging window) so metrics.json
            # compares mfm_posonly_* with loss_mfm_* on an equal footing.
            self.log_meter(storage, meter)
        return losses

    def log_meter(self, storage, meter: Dict[str, torch.Tensor]) -> None:
        """Put the ``mfm_posonly_*`` meter (detached scalars) into ``storage``, averaged over processes."""
        names = sorted(meter)
        vals = torch.stack([meter[k].detach().float() for k in names])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vals)
            vals = vals / dist.get_world_size()
        storage.put_scalars(**{k: float(v) for k, v in zip(names, vals.tolist())})

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> Dict[str, object]:
        """Eval-mode output for normalised ``images`` (see ``forward``)."""
        B, _, H, W = images.shape
        u = self.unit_size
        grid = (H // u, W // u)
        gen = torch.Generator().manual_seed(self.eval_mask_seed)
        ids_keep, mask = self.mask_generator(B, grid, self.mask_ratio, device=self.device, generator=gen)
        out = self.predict(images, ids_keep)
        raw = images * self.pixel_std + self.pixel_mean
        result = {"image": raw, "mask": mask.view(B, *grid), "target": raw.clone()}
        if out["mim"] is None:
            return result

        if self.per_level_mim:
            levels = {
                lv.name: self.prediction_to_image(p.float(), images, lv.tokens_per_unit_side)
                for lv, p in zip(PYRAMID_LEVELS, out["mim"])
            }
            result["pred_pixels_levels"] = levels
            result["pred_pixels"] = levels[PYRAMID_LEVELS[0].name]  # the finest level
            # pixels per side of the tokens pred_pixels was de-normalised by (true mean / std each)
            result["pred_token_size"] = u // PYRAMID_LEVELS[0].tokens_per_unit_side
        else:
            result["pred_pixels"] = self.prediction_to_image(out["mim"].float(), images, 1)
            result["pred_token_size"] = u
        return result

    def prediction_to_image(self, pred: torch.Tensor, images: torch.Tensor, k: int) -> torch.Tensor:
        """Pixel predictions (B, N, k, k, s*s*3) (or (B, N, k*k*s*s*3)), s = unit_size / k, in the loss's
        space -> (B, 3, H, W) 0-255 RGB. With norm-pix loss each token is de-normalised with the
        mean/std of the same token of ``images`` (normalised input), as MAE's visualisation does."""
        u = self.unit_size
        pred = pred.reshape(pred.shape[0], pred.shape[1], k, k, -1)
        if self.norm_pix_loss:
            pred = denormalize_unit_predictions(pred, images, u)
        x = unpatchify_units(pred, (images.shape[-2] // u, images.shape[-1] // u), u)
        return x * self.pixel_std + self.pixel_mean
