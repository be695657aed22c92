"""Conversions between image-shaped tensors and the unit layout.

Unit layout: a level's features are (B, N, k, k, C), N the units in raster order over
the (H/unit_size, W/unit_size) unit grid and (k, k) the (row, column) of a token inside its unit
(k = ``tokens_per_unit_side`` of :mod:`itpn_d2.modeling.levels`). Pixels in unit layout
are "patchified": each token's s x s pixels (s = unit_size / k) flattened in (row, col,
channel) order, MAE's ``patchify`` when k = 1.
"""
from typing import Tuple

import torch

__all__ = ["units_to_map", "map_to_units", "patchify_units", "unpatchify_units", "denormalize_unit_predictions"]


def units_to_map(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Unit layout (B, h*w, k, k, C) -> image-shaped map (B, C, h*k, w*k)."""
    B, N, s1, s2, C = x.shape
    h, w = grid
    assert N == h * w, f"{N} units do not fill a {h}x{w} grid"
    return x.view(B, h, w, s1, s2, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * s1, w * s2)


def map_to_units(x: torch.Tensor, k: int) -> torch.Tensor:
    """Image-shaped map (B, C, h*k, w*k) -> unit layout (B, h*w, k, k, C)."""
    B, C, H, W = x.shape
    h, w = H // k, W // k
    return x.view(B, C, h, k, w, k).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, k, k, C)


def patchify_units(images: torch.Tensor, unit_size: int, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, k, k, s*s*C) with s = unit_size // k: each unit's k x k tokens,
    each token's pixels in (row, col, channel) order. k = 1 gives MAE's (B, N, 1, 1, 16*16*C)."""
    B, C, H, W = images.shape
    s = unit_size // k
    h, w = H // unit_size, W // unit_size
    x = images.reshape(B, C, h, k, s, w, k, s)
    x = x.permute(0, 2, 5, 3, 6, 4, 7, 1)  # B, h, w, k(row), k(col), s(row), s(col), C
    return x.reshape(B, h * w, k, k, s * s * C)


def unpatchify_units(tokens: torch.Tensor, grid: Tuple[int, int], unit_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify_units`: (B, h*w, k, k, s*s*C) -> (B, C, h*unit_size, w*unit_size)."""
    B, N, k, _, D = tokens.shape
    h, w = grid
    s = unit_size // k
    C = D // (s * s)
    if N != h * w or C * s * s != D:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit a {h}x{w} grid of {unit_size}px units")
    x = tokens.reshape(B, h, w, k, k, s, s, C).permute(0, 7, 1, 3, 5, 2, 4, 6)  # B, C, h, k, s, w, k, s
    return x.reshape(B, C, h * unit_size, w * unit_size)


def denormalize_unit_predictions(
    pred: torch.Tensor, images: torch.Tensor, unit_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """Undo the norm-pix target normalisation of pixel predictions.

    Norm-pix targets are each token's pixels standardised by the token's own mean and std.
    As in MAE's visualisation, a predicted token is mapped back with the mean/std of the
    same token of ``images`` (the true pixels, in the space the targets were taken from).

    Args:
        pred: (B, N, k, k, s*s*C) predictions, s = unit_size / k.
        images: (B, C, H, W) the pixels the targets were patchified from.
    Returns:
        (B, N, k, k, s*s*C) predictions in the space of ``images``.
    """
    t = patchify_units(images, unit_size, pred.shape[2])
    mean = t.mean(-1, keepdim=True)
    std = (t.var(-1, keepdim=True, unbiased=False) + eps) ** 0.5
    return pred * std + mean
