"""Reconstruction figures for masked-image-modeling pre-training.

One row per image, four panels side by side (all ``H x W``, uint8 RGB):

    original | masked input (masked units grey) | reconstruction | reconstruction with visible units pasted back

Layout conventions follow :mod:`itpn_d2.modeling.pretrainer`: units are ``unit x unit``
pixel squares in raster order; a unit's pixels are flattened in (row, col, channel)
order (MAE's ``patchify``); ``mask`` is True for masked units.
"""
from typing import Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "unit_mask_to_pixels",
    "units_to_image",
    "denormalize_unit_predictions",
    "compose_reconstruction_panel",
    "stack_rows",
    "panels_from_model_output",
    "load_eval_image",
]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().to("cpu", torch.float32 if x.is_floating_point() else x.dtype).numpy()
    return np.asarray(x)


def _to_uint8_hwc(image: ArrayLike) -> np.ndarray:
    """(3, H, W) or (H, W, 3) 0-255 float/uint8 -> (H, W, 3) uint8 (rounded, clipped)."""
    a = _to_numpy(image)
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def unit_mask_to_pixels(mask: ArrayLike, grid: Tuple[int, int], unit: int) -> np.ndarray:
    """(N,) or (h, w) unit mask -> (h*unit, w*unit) bool pixel mask."""
    m = _to_numpy(mask).astype(bool)
    h, w = grid
    if m.size != h * w:
        raise ValueError(f"mask has {m.size} entries, the unit grid {h}x{w} needs {h * w}")
    return np.kron(m.reshape(h, w), np.ones((unit, unit), dtype=bool)).astype(bool)


def units_to_image(patches: torch.Tensor, grid: Tuple[int, int], unit: int) -> torch.Tensor:
    """(N, unit*unit*C) per-unit pixels, (row, col, channel) order -> (C, h*unit, w*unit)."""
    h, w = grid
    N, D = patches.shape
    C = D // (unit * unit)
    if N != h * w or C * unit * unit != D:
        raise ValueError(f"patches {tuple(patches.shape)} do not fit a {h}x{w} grid of {unit}px units")
    x = patches.reshape(h, w, unit, unit, C).permute(4, 0, 2, 1, 3)
    return x.reshape(C, h * unit, w * unit)


def _image_to_units(image: torch.Tensor, unit: int) -> torch.Tensor:
    C, H, W = image.shape
    x = image.reshape(C, H // unit, unit, W // unit, unit).permute(1, 3, 2, 4, 0)
    return x.reshape((H // unit) * (W // unit), unit * unit * C)


def denormalize_unit_predictions(
    pred: torch.Tensor,
    image: torch.Tensor,
    *,
    unit: int = 16,
    pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
    pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """
    Map per-unit pixel predictions back to a 0-255 RGB image.

    The model predicts in the normalised input space ``(x - pixel_mean) / pixel_std``;
    with norm-pix targets each unit is further normalised by its own mean and std.
    As in MAE's visualisation, a predicted unit is de-normalised with the mean/std of
    the TARGET unit (the true pixels), then ``pixel_std`` / ``pixel_mean`` are undone.

    Args:
        pred: (N, unit*unit*3) predictions in raster unit order.
        image: (3, H, W) the input, 0-255 RGB.
    Returns:
        (3, H, W) float reconstruction, 0-255 scale (not clipped).
    """
    image = image.detach().float().cpu()
    pred = pred.detach().float().cpu()
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
    _, H, W = image.shape
    grid = (H // unit, W // unit)
    if norm_pix:
        t = _image_to_units((image - mean) / std, unit)
        t_mean = t.mean(-1, keepdim=True)
        t_std = (t.var(-1, keepdim=True, unbiased=False) + eps) ** 0.5
        pred = pred * t_std + t_mean
    return units_to_image(pred, grid, unit) * std + mean


def compose_reconstruction_panel(
    image: ArrayLike,
    mask: ArrayLike,
    reconstruction: ArrayLike,
    *,
    unit: int = 16,
    gap: int = 4,
    grey: int = 128,
    background: int = 255,
) -> np.ndarray:
    """
    Args:
        image: (3, H, W) (or (H, W, 3)) original, 0-255.
        mask: (N,) or (H/unit, W/unit) bool, True = masked unit.
        reconstruction: (3, H, W) (or (H, W, 3)) reconstruction of every unit, 0-255.
        unit: mask-unit size in pixels.
        gap: width of the separator between panels; ``background`` its value.
        grey: value that fills masked units in the masked-input panel.
    Returns:
        (H, 4*W + 3*gap, 3) uint8: original | masked input | reconstruction | pasted,
        where "pasted" holds the original pixels in visible units (bit-exact) and the
        reconstruction in masked units.
    """
    orig = _to_uint8_hwc(image)
    recon = _to_uint8_hwc(reconstruction)
    H, W = orig.shape[:2]
    if recon.shape != orig.shape:
        raise ValueError(f"reconstruction shape {recon.shape} != image shape {orig.shape}")
    if H % unit or W % unit:
        raise ValueError(f"image size {H}x{W} is not a multiple of the {unit}px unit")
    pix = unit_mask_to_pixels(mask, (H // unit, W // unit), unit)[:, :, None]
    masked = np.where(pix, np.uint8(grey), orig)
    pasted = np.where(pix, recon, orig)
    sep = np.full((H, gap, 3), background, np.uint8)
    parts = []
    for i, p in enumerate((orig, masked, recon, pasted)):
        if i:
            parts.append(sep)
        parts.append(p)
    return np.concatenate(parts, axis=1)


def stack_rows(rows: Sequence[np.ndarray], *, gap: int = 4, background: int = 255) -> np.ndarray:
    """Stack panels of equal width vertically with ``gap`` pixel separators."""
    if not rows:
        raise ValueError("stack_rows needs at least one row")
    width = rows[0].shape[1]
    if any(r.shape[1] != width for r in rows):
        raise ValueError(f"rows differ in width: {[r.shape[1] for r in rows]}")
    parts = []
    for i, r in enumerate(rows):
        if i:
            parts.append(np.full((gap, width, 3), background, np.uint8))
        parts.append(r)
    return np.concatenate(parts, axis=0)


def panels_from_model_output(out, *, unit: int = 16, pixel_mean=None, pixel_std=None, norm_pix: bool = True, gap: int = 4):
    """
    Compose one panel per image from a pre-training model's eval output.

    Accepts either :class:`itpn_d2.modeling.pretrainer.MaskedPretrainer`'s eval dict
    ("image" (B,3,H,W), "mask" (B,h,w), "pred_pixels" (B,3,H,W) already in 0-255), or a
    list of per-image dicts with "image" (3,H,W), "mask" (N,), "pred_pixels" (N, unit*unit*3)
    in the (normalised, if ``norm_pix``) prediction space.

    Returns:
        list of (H, 4W+3*gap, 3) uint8 arrays.
    """
    if isinstance(out, dict):
        if "pred_pixels" not in out:
            raise KeyError("model output has no 'pred_pixels': the model has no pixel decoder to visualise")
        items = [
            {"image": out["image"][i], "mask": out["mask"][i], "pred_pixels": out["pred_pixels"][i]}
            for i in range(len(out["image"]))
        ]
    else:
        items = list(out)
    panels = []
    for d in items:
        image, pred = d["image"], d["pred_pixels"]
        if pred.dim() == 2:  # (N, unit*unit*3) per-unit predictions
            kw = {}
            if pixel_mean is not None:
                kw["pixel_mean"] = [float(v) for v in torch.as_tensor(pixel_mean).flatten()]
            if pixel_std is not None:
                kw["pixel_std"] = [float(v) for v in torch.as_tensor(pixel_std).flatten()]
            pred = denormalize_unit_predictions(pred, image, unit=unit, norm_pix=norm_pix, **kw)
        panels.append(compose_reconstruction_panel(image, d["mask"], pred, unit=unit, gap=gap))
    return panels


def load_eval_image(file_name: str, size: int) -> torch.Tensor:
    """
    Read an image (any mode, see :func:`itpn_d2.data.mim_mapper.read_rgb_image`), resize
    its shorter side to ``size`` (bicubic) and take the centre ``size x size`` crop.

    Returns:
        (3, size, size) float32, 0-255 RGB (the pre-training model's input format).
    """
    from detectron2.data import transforms as T
    from fvcore.transforms.transform import CropTransform
    from PIL import Image

    from itpn_d2.data.mim_mapper import read_rgb_image

    img = read_rgb_image(file_name)
    h, w = img.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    img = T.ResizeTransform(h, w, nh, nw, interp=Image.BICUBIC).apply_image(img)
    img = CropTransform((nw - size) // 2, (nh - size) // 2, size, size).apply_image(img)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
