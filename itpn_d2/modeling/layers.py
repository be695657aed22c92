"""Transformer layers shared by the encoder, the pyramid and the pre-training decoders.

``MlpBlock`` (HiViT's stride-4/8 stages and the pyramid's C-MLPs), ``Attention`` and
``AttentionBlock`` (HiViT's stride-16 stage and the decoders), plus the two helpers every
module here builds with: :func:`layer_norm` (eps 1e-6, as the iTPN release) and
:func:`init_weights` (applied with ``module.apply``).

Attribute names (``norm1``, ``attn``, ``norm2``, ``mlp``, ``gamma_1``, ``gamma_2``,
``relative_position_bias_table``) match the official checkpoints.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from .drop_path import DropPath
from .pos_embed import resize_rel_pos_table

__all__ = ["layer_norm", "init_weights", "MlpBlock", "Attention", "AttentionBlock", "relative_position_index"]


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm over the last dim with the release's eps (1e-6, not torch's 1e-5)."""
    return nn.LayerNorm(dim, eps=1e-6)


def init_weights(m: nn.Module) -> None:
    """Initialisation for ``module.apply``: truncated-normal (std 0.02) Linear weights, zero biases,
    unit/zero LayerNorms, and Xavier-uniform Conv2d weights viewed as a Linear layer."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        # As MAE: treat the patch projection like a Linear layer.
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MlpBlock(nn.Module):
    """``x + DropPath(MLP(LN(x)))`` on the last dim; any leading shape.

    Used for HiViT's stride-4/8 stages and, as the C-MLP, throughout the pyramid.
    The attribute names (``norm2``, ``mlp``, ``gamma_2``) match the official checkpoints:
    with layer-scale (the CLIP variant) the stem blocks carry ``gamma_2`` too, the
    pyramid's C-MLPs never do.
    """

    def __init__(
        self, *, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, layer_scale_init: Optional[float] = None
    ):
        super().__init__()
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path)  # no parameters: identity at 0, keys unchanged
        if layer_scale_init is not None:
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        m = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            m = self.gamma_2 * m
        return x + self.drop_path(m)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    With ``rel_pos_grid`` set, a Swin-style relative position bias table of
    ``(2S-1)^2`` entries per head is learnt at the pre-training grid ``S x S`` and
    resized bicubically for other grids.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        rel_pos_grid: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_grid = tuple(rel_pos_grid) if rel_pos_grid else None
        if self.rel_pos_grid:
            gh, gw = self.rel_pos_grid
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1), num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)

    def zero_rel_pos_table(self, grid: int) -> None:
        """Replace the bias table by a zero one for a ``grid x grid`` grid (the identity of
        attention until training learns it)."""
        old = self.relative_position_bias_table
        self.rel_pos_grid = (grid, grid)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * grid - 1) ** 2, self.num_heads, dtype=old.dtype, device=old.device)
        )

    def rel_pos_bias(
        self, rel_index: torch.Tensor, grid: Tuple[int, int], dtype: Optional[torch.dtype] = None
    ) -> torch.Tensor:
        """Bias for a ``grid``; ``rel_index`` (L, L) or (B, L, L) indexes a (2h-1)(2w-1) table.

        Returns a contiguous (heads, L, L) or (B, heads, L, L) tensor in ``dtype`` (default: the
        autocast dtype when autocast is on, else the table's). SDPA's flash / memory-efficient
        kernels need the bias contiguous in its last dimension and in the query's dtype; built
        any other way (``table[rel_index].movedim(-1, -3)``) the flash kernel is excluded and the
        memory-efficient one copies the bias in every block.
        """
        table = resize_rel_pos_table(self.relative_position_bias_table, self.rel_pos_grid, grid)
        if dtype is None:
            dev = table.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else table.dtype
        table_t = table.to(dtype).T.contiguous()  # (heads, T): the gather writes (heads, L, L) in place
        L = rel_index.shape[-1]
        if rel_index.dim() == 2:
            return torch.index_select(table_t, 1, rel_index.reshape(-1)).view(self.num_heads, L, L)
        B = rel_index.shape[0]
        idx = rel_index.reshape(B, 1, L * L).expand(B, self.num_heads, L * L)
        out = torch.gather(table_t.unsqueeze(0).expand(B, -1, -1), 2, idx)
        return out.view(B, self.num_heads, L, L)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, L, C); attn_bias: broadcastable to (B, heads, L, L) or None. Returns (B, L, C)."""
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class AttentionBlock(nn.Module):
    """Pre-LN transformer block on (B, L, C), optional layer-scale (``gamma_1``, ``gamma_2``)."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: Optional[float] = None,
        rel_pos_grid: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, rel_pos_grid=rel_pos_grid)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path)  # no parameters: identity at 0, keys unchanged
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, rel_index: Optional[torch.Tensor] = None, grid=None) -> torch.Tensor:
        """x: (B, L, C); rel_index: (L, L) or (B, L, L) from :func:`relative_position_index`
        (restricted to the kept tokens), with ``grid`` the (h, w) it was built for; or None."""
        bias = None
        if rel_index is not None:
            bias = self.attn.rel_pos_bias(rel_index, grid)
            if bias.dim() == 3:  # shared by the batch
                bias = bias.unsqueeze(0)
        a = self.attn(self.norm1(x), bias)
        if self.gamma_1 is not None:
            a = self.gamma_1 * a
        x = x + self.drop_path(a, branch=0)
        m = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            m = self.gamma_2 * m
        return x + self.drop_path(m, branch=1)  # decided independently of the attention branch


def relative_position_index(h: int, w: int, device=None) -> torch.Tensor:
    """(h*w, h*w) index into a (2h-1)*(2w-1) relative-position table, tokens in raster order."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, L)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
