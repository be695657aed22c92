"""Fixed 2-D sine-cosine position embeddings, and resizing of learnt absolute and relative position tables."""
from typing import Tuple

import torch
import torch.nn.functional as F


def get_2d_sincos_pos_embed(dim: int, h: int, w: int, temperature: float = 10000.0) -> torch.Tensor:
    """(h*w, dim) embedding: half the channels encode the row, half the column (MAE convention)."""
    assert dim % 4 == 0, f"sin-cos position embedding needs dim divisible by 4, got {dim}"
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")

    def enc(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    # MAE puts the width coordinate first.
    return torch.cat([enc(xs), enc(ys)], dim=1).float()


def resize_pos_embed(pos: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1, h*w, C) table from ``src_grid`` to ``dst_grid``."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    C = pos.shape[-1]
    x = pos.reshape(1, src_grid[0], src_grid[1], C).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return x.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], C)


def resize_rel_pos_table(table: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a ((2h-1)(2w-1), heads) relative position bias table from ``src_grid``
    (h, w) to ``dst_grid``: the table is an image of relative offsets, one channel per head.

    The attention blocks call it at run time for an input grid other than the pre-training one,
    and the converter at conversion time, so both compute the same bias.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return table
    heads = table.shape[1]
    (sh, sw), (h, w) = src_grid, dst_grid
    x = table.T.reshape(1, heads, 2 * sh - 1, 2 * sw - 1)
    x = F.interpolate(x, size=(2 * h - 1, 2 * w - 1), mode="bicubic", align_corners=False)
    return x.reshape(heads, -1).T
