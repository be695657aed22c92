"""Decoders that turn the pyramid of the *visible* units into predictions for all units.

With MAE-style dropping, masked units have no pyramid features at all, so every
prediction at a masked unit has to come from a decoder that fills masked units
with a mask token and lets them attend to the visible ones. Two decoders:

``PixelDecoder`` — the iTPN release's pixel decoder (fused levels).
    For each level (p4, p3, p2: strides 16, 8, 4) ``decoder_embed[l] = LN(D) + Linear(D -> E/k^2)``
    with k = 1, 2, 4 tokens per unit side, so the k*k sub-tokens of a unit
    concatenate (raster order) into one E-dim vector; each level is padded with
    the shared ``mask_token`` at masked units, the three levels are summed, a fixed
    2-D sin-cos ``decoder_pos_embed`` is added, then ``depth`` transformer blocks,
    ``decoder_norm``, ``decoder_pred: Linear(E -> 16*16*3)``. Depth 8 in the
    official layout, 6 in mmpretrain's. Attribute names follow the release.
    ``levels=(16,)`` keeps the stride-16 input only: MAE's decoder on the encoder's
    last output, for the backbone-only baseline (no pyramid in pre-training).

``LevelDecoder`` — per-level supervision (ours; the release has none).
    Each level keeps its own output: level l is embedded the same way
    (LN + Linear(D -> E/k^2), concatenated to E per unit), padded with its own
    learnt mask token, given the decoder position embedding and a learnt level
    embedding, and decoded by a transformer decoder whose weights are *shared* by
    the three levels (the levels run as one 3B batch; sharing keeps the extra cost
    to one small decoder and makes the levels solve the same in-filling problem).
    A per-level head ``LN -> Linear(E -> k*k*out_dim[l])`` then gives one output
    per level token: (B, N, k, k, out_dim[l]). The pre-trainer uses it for
    per-level pixels (out_dim = s*s*3, the pixels a stride-s token covers) and for
    MFM (out_dim = the teacher's feature width).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import AttentionBlock, init_weights, layer_norm
from .levels import LEVELS_BY_STRIDE, PYRAMID_LEVELS, UNIT_SIZE
from .pos_embed import get_2d_sincos_pos_embed

__all__ = ["PixelDecoder", "LevelDecoder"]


def _scatter_units(x: torch.Tensor, ids_keep: Optional[torch.Tensor], fill: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N_vis, E) at ``ids_keep`` -> (B, N, E) in raster order, ``fill`` (E,) elsewhere."""
    if ids_keep is None:
        return x
    B, _, E = x.shape
    full = fill.to(x.dtype).expand(B, n, E)
    return full.scatter(1, ids_keep[:, :, None].expand(-1, -1, E), x)


class _DecoderPos:
    """Fixed sin-cos decoder position embedding, stored as a frozen parameter at the
    pre-training grid (as the release and mmpretrain do, so it counts in numel and
    loads from their checkpoints) and recomputed exactly for any other grid."""

    def __init__(self, dim: int, grid: Tuple[int, int]):
        self.grid = tuple(grid)
        self.dim = dim

    def init_param(self, owner: nn.Module):
        pos = get_2d_sincos_pos_embed(self.dim, *self.grid).unsqueeze(0)
        owner.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)

    def get(self, owner: nn.Module, grid: Tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return owner.decoder_pos_embed.to(ref.dtype)
        return get_2d_sincos_pos_embed(self.dim, *grid).unsqueeze(0).to(device=ref.device, dtype=ref.dtype)


def _level_embed(in_dim: int, dec_dim: int, k: int) -> nn.Sequential:
    if dec_dim % (k * k):
        raise ValueError(f"decoder dim {dec_dim} is not divisible by {k * k} sub-tokens per unit")
    return nn.Sequential(layer_norm(in_dim), nn.Linear(in_dim, dec_dim // (k * k)))


class PixelDecoder(nn.Module):
    """The release's fused pixel decoder (see module docstring)."""

    def __init__(
        self,
        *,
        in_dim: int = 256,
        dec_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        levels: Sequence[int] = tuple(lv.stride for lv in reversed(PYRAMID_LEVELS)),
    ):
        """
        Args:
            in_dim: pyramid width D (with ``levels=(16,)``: the width of the stride-16 input,
                e.g. the encoder's C).
            dec_dim: decoder width E (divisible by 16).
            depth: decoder blocks (8 official, 6 mmpretrain).
            in_chans: predictions are 16 * 16 * in_chans values per unit.
            pretrain_img_size: grid of the stored ``decoder_pos_embed``.
            levels: strides read, a non-empty subset of (16, 8, 4) in that order (the
                release's ``decoder_embed`` order); (16,) for the backbone-only baseline.
        """
        super().__init__()
        levels = tuple(int(s) for s in levels)
        in_order = list(levels) == sorted(set(levels), reverse=True)
        if not levels or any(s not in LEVELS_BY_STRIDE for s in levels) or not in_order:
            raise ValueError(
                f"PixelDecoder.levels must be a non-empty subset of (16, 8, 4) in that order, got {levels}"
            )
        self.levels = levels
        self.unit_size = UNIT_SIZE
        self.in_chans = in_chans
        self.decoder_embed = nn.ModuleList(
            [_level_embed(in_dim, dec_dim, LEVELS_BY_STRIDE[s].tokens_per_unit_side) for s in levels]
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        g = pretrain_img_size // UNIT_SIZE
        self._pos = _DecoderPos(dec_dim, (g, g))
        self._pos.init_param(self)
        self.decoder_blocks = nn.ModuleList(
            [AttentionBlock(dim=dec_dim, num_heads=num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)]
        )
        self.decoder_norm = layer_norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, UNIT_SIZE * UNIT_SIZE * in_chans)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self,
        feats: Sequence[torch.Tensor],
        ids_keep: Optional[torch.Tensor],
        grid: Tuple[int, int],
    ) -> torch.Tensor:
        """
        Args:
            feats: (p2, p3, p4) of the kept units: (B, N_vis, 4, 4, D), (B, N_vis, 2, 2, D),
                (B, N_vis, 1, 1, D) (``ITPNBackbone.forward_units(...).pyramid``); levels not in
                ``self.levels`` are ignored (may be None).
            ids_keep: (B, N_vis) raster indices of the kept units, or None if nothing is masked.
            grid: the unit grid (h, w), N = h * w.
        Returns:
            (B, N, 16 * 16 * in_chans) pixel predictions for every unit, each unit's
            values in (row, col, channel) order.
        """
        by_stride = {lv.stride: f for lv, f in zip(PYRAMID_LEVELS, feats)}
        n = grid[0] * grid[1]
        x = None
        # decoder_embed order is strides 16, 8, 4 (the release's). The release pads each
        # level with the mask token and sums; summing the visible units first and padding
        # once with the L-fold token is the same sum with one scatter instead of L.
        for emb, s in zip(self.decoder_embed, self.levels):
            f = by_stride[s]
            B, nv = f.shape[:2]
            y = emb(f).reshape(B, nv, -1)
            x = y if x is None else x + y
        tok = self.mask_token[0, 0].to(x.dtype) * len(self.levels)
        x = _scatter_units(x, ids_keep, tok, n)
        x = x + self._pos.get(self, grid, x)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))


class LevelDecoder(nn.Module):
    """Per-level decoding with one shared transformer decoder (see module docstring)."""

    def __init__(
        self,
        *,
        in_dim: int = 256,
        out_dims: Sequence[int] = (48, 192, 768),
        dec_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        pretrain_img_size: int = 224,
    ):
        """
        Args:
            in_dim: pyramid width D.
            out_dims: output width per token for levels (p2, p3, p4) = strides (4, 8, 16);
                the default is per-level pixels (s*s*3).
            dec_dim: decoder width E (divisible by 16).
            depth: blocks of the shared decoder (0: heads act on embedded tokens only,
                masked units then see only their mask token).
        """
        super().__init__()
        if len(out_dims) != 3:
            raise ValueError(f"LevelDecoder.out_dims needs 3 entries (p2, p3, p4), got {out_dims}")
        self.out_dims = tuple(int(d) for d in out_dims)
        self.ks = tuple(lv.tokens_per_unit_side for lv in PYRAMID_LEVELS)
        self.unit_size = UNIT_SIZE
        self.decoder_embed = nn.ModuleList([_level_embed(in_dim, dec_dim, k) for k in self.ks])
        self.mask_token = nn.Parameter(torch.zeros(3, dec_dim))
        self.level_embed = nn.Parameter(torch.zeros(3, dec_dim))
        g = pretrain_img_size // UNIT_SIZE
        self._pos = _DecoderPos(dec_dim, (g, g))
        self._pos.init_param(self)
        self.decoder_blocks = nn.ModuleList(
            [AttentionBlock(dim=dec_dim, num_heads=num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)]
        )
        self.decoder_norm = nn.ModuleList([layer_norm(dec_dim) for _ in range(3)])
        self.decoder_pred = nn.ModuleList([nn.Linear(dec_dim, k * k * d) for k, d in zip(self.ks, self.out_dims)])
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.level_embed, std=0.02)

    def forward(
        self,
        feats: Sequence[torch.Tensor],
        ids_keep: Optional[torch.Tensor],
        grid: Tuple[int, int],
    ) -> List[torch.Tensor]:
        """
        Args:
            feats: (p2, p3, p4) of the kept units, as for ``PixelDecoder``.
            ids_keep: (B, N_vis) kept raster indices, or None.
            grid: unit grid (h, w), N = h * w.
        Returns:
            [(B, N, 4, 4, out_dims[0]), (B, N, 2, 2, out_dims[1]), (B, N, 1, 1, out_dims[2])]
            for all units, levels p2, p3, p4.
        """
        n = grid[0] * grid[1]
        xs = []
        for i, f in enumerate(feats):
            B, nv = f.shape[:2]
            y = _scatter_units(self.decoder_embed[i](f).reshape(B, nv, -1), ids_keep, self.mask_token[i], n)
            xs.append(y + self.level_embed[i])
        x = torch.cat(xs, 0)  # (3B, N, E): one batch through the shared decoder
        x = x + self._pos.get(self, grid, x)
        for blk in self.decoder_blocks:
            x = blk(x)
        outs = []
        for i, y in enumerate(x.chunk(3, 0)):
            k = self.ks[i]
            y = self.decoder_pred[i](self.decoder_norm[i](y))
            outs.append(y.reshape(y.shape[0], n, k, k, self.out_dims[i]))
        return outs
