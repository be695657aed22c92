"""Reconstruction figures for masked-image-modeling pre-training.

One row per image, four panels side by side (all ``H x W``, uint8 RGB):

    original | masked input (masked units grey) | reconstruction | reconstruction with visible units pasted back

Layout conventions follow :mod:`itpn_d2.modeling.pretrainer`: units are ``unit x unit``
pixel squares in raster order; ``mask`` is True for masked units. The model's eval output
is already in 0-255 RGB (norm-pix predictions de-normalised by the model, see
:func:`itpn_d2.modeling.unit_layout.denormalize_unit_predictions`).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "unit_mask_to_pixels",
    "compose_reconstruction_panel",
    "stack_rows",
    "panels_from_model_output",
    "masked_unit_errors",
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


def panels_from_model_output(
    out: Dict[str, torch.Tensor], *, unit: Optional[int] = None, gap: int = 4
) -> List[np.ndarray]:
    """
    Compose one panel per image from :class:`itpn_d2.modeling.pretrainer.MaskedPretrainer`'s
    eval output: "image" (B, 3, H, W) and "pred_pixels" (B, 3, H, W), both 0-255, and "mask"
    (B, H/unit, W/unit) bool.

    Args:
        unit: mask-unit size in pixels; by default read off the shapes (H / mask rows).
    Returns:
        list of (H, 4W+3*gap, 3) uint8 arrays.
    """
    if "pred_pixels" not in out:
        raise KeyError("model output has no 'pred_pixels': the model has no pixel decoder to visualise")
    if unit is None:
        unit = out["image"].shape[-2] // out["mask"].shape[-2]
    return [
        compose_reconstruction_panel(image, mask, pred, unit=unit, gap=gap)
        for image, mask, pred in zip(out["image"], out["mask"], out["pred_pixels"])
    ]


def masked_unit_errors(
    image: ArrayLike, mask: ArrayLike, reconstruction: ArrayLike, *, unit: int = 16, token: Optional[int] = None
) -> Dict[str, Optional[float]]:
    """
    How much of the masked units' content a reconstruction recovers beyond what its
    de-normalisation already leaks.

    With norm-pix targets the figures de-normalise each predicted token with the true token's
    mean and std (as MAE's figures do), so even a prediction of zeros comes back at about the
    right brightness, token by token. The fair line is therefore "each masked token filled with
    its true mean colour" (per channel: stricter than the one grey mean the de-normalisation
    uses): a reconstruction below it has drawn structure (edges, shapes) inside the tokens; one
    at or above it has not.

    Args:
        image, reconstruction: (3, H, W) (or (H, W, 3)) 0-255, H and W multiples of ``unit``.
        mask: (N,) or (H/unit, W/unit) bool, True = masked unit.
        unit: mask-unit size in pixels.
        token: size of the tokens the prediction was de-normalised by (the model's
            ``pred_token_size``: the unit for MAE-style prediction, 4 px for the p2 level of
            per-level prediction); default ``unit``.
    Returns:
        ``mse`` (reconstruction vs image over masked pixels, 0-255 scale), ``flat_mse`` (each
        masked token's true mean colour vs image), ``ratio`` = mse / flat_mse (< 1: structure
        inside the tokens is reconstructed; None when the masked tokens are flat, flat_mse 0),
        ``masked_units``.
    """
    orig = _to_uint8_hwc(image).astype(np.float64)
    recon = _to_uint8_hwc(reconstruction).astype(np.float64)
    H, W = orig.shape[:2]
    token = unit if token is None else token
    if recon.shape != orig.shape:
        raise ValueError(f"reconstruction shape {recon.shape} != image shape {orig.shape}")
    if H % unit or W % unit or unit % token:
        raise ValueError(f"image size {H}x{W}, unit {unit} px and token {token} px do not tile")
    h, w = H // unit, W // unit
    m = _to_numpy(mask).astype(bool).reshape(h, w)
    if not m.any():
        raise ValueError("mask has no masked unit")
    tokens = orig.reshape(H // token, token, W // token, token, 3)
    flat = np.broadcast_to(tokens.mean(axis=(1, 3), keepdims=True), tokens.shape).reshape(H, W, 3)
    pix = unit_mask_to_pixels(m, (h, w), unit)
    mse = float(((recon - orig) ** 2)[pix].mean())
    flat_mse = float(((flat - orig) ** 2)[pix].mean())
    return {"mse": mse, "flat_mse": flat_mse, "ratio": mse / flat_mse if flat_mse > 0 else None,
            "masked_units": int(m.sum())}


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
