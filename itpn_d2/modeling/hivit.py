"""HiViT: the hierarchical encoder of iTPN.

An image is cut into 16x16-pixel *mask units*. Inside a unit the first two stages
work on a 4x4 (stride 4) and then a 2x2 (stride 8) grid of tokens with MLP-only
blocks, so no information ever crosses a unit boundary before the stride-16
attention stage. That is what lets pre-training drop masked units *before* stage
one (MAE-style) and still be exact: a visible token can never see a masked unit.

Outputs, one per pyramid level (:mod:`itpn_d2.modeling.levels`), in unit layout
(:mod:`itpn_d2.modeling.unit_layout`):
    c2, stride 4:  (B, N, 4, 4, C/4)
    c3, stride 8:  (B, N, 2, 2, C/2)
    c4, stride 16: (B, N, C)
with N the number of (kept) units in raster order and the two inner dims the
(row, column) of a token inside its unit.

Parameter names follow the official iTPN release (``patch_embed``, ``blocks.i``,
``absolute_pos_embed``) so converting its weights is a prefix change.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint

from .drop_path import DropPath
from .layers import AttentionBlock, MlpBlock, init_weights, layer_norm, relative_position_index
from .levels import PYRAMID_LEVELS, UNIT_SIZE
from .pos_embed import get_2d_sincos_pos_embed, resize_pos_embed

__all__ = ["PatchEmbed", "PatchMerge", "HiViT", "HIVIT_ARCHS", "hivit_arch"]


class PatchEmbed(nn.Module):
    """4x4 patch embedding, regrouped into 16x16-pixel mask units.

    (B, 3, H, W) -> (B, H/16 * W/16, 4, 4, embed_dim)

    The stride-4 convolution is computed as a Linear over the 4x4x3 pixels of each
    patch, with the pixels put in unit layout first: rearranging the 3-channel
    image is cheaper than rearranging the embed_dim-channel feature map, and with
    ``ids_keep`` only the kept units are projected (a masked unit's patches never
    reach the projection). ``proj`` stays a ``Conv2d`` so weights and names are unchanged.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        embed_dim: int = 128,
        unit_size: int = UNIT_SIZE,
        inner: int = PYRAMID_LEVELS[0].tokens_per_unit_side,
    ):
        super().__init__()
        self.unit_size = unit_size
        self.inner = inner
        stride = unit_size // inner
        self.patch_size = stride
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=stride, stride=stride)
        self.norm = layer_norm(embed_dim)

    def forward(self, x: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, C_in, H, W); ids_keep: optional (B, N_vis) kept unit indices (raster order).
        Returns (B, N or N_vis, inner, inner, embed_dim)."""
        B, cin, H, W = x.shape
        hu, wu, i, p = H // self.unit_size, W // self.unit_size, self.inner, self.patch_size
        # (B, cin, hu, i, p, wu, i, p) -> (B, hu, wu, i, i, cin, p, p): Conv2d weight order (cin, kh, kw).
        x = x.reshape(B, cin, hu, i, p, wu, i, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.reshape(B, hu * wu, i, i, cin * p * p)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))
        w = self.proj.weight
        x = F.linear(x, w.view(w.shape[0], -1), self.proj.bias)
        return self.norm(x)


class PatchMerge(nn.Module):
    """2x2 token merge inside each unit: (B, N, h, w, c) -> (B, N, h/2, w/2, 2c)."""

    def __init__(self, *, dim: int):
        super().__init__()
        self.norm = layer_norm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Concatenation order (row, col) = (0,0), (1,0), (0,1), (1,1), as in Swin and the
        # iTPN release: column offset outer, row offset inner. One permute (one copy)
        # instead of four strided slices and a cat.
        *lead, h, w, c = x.shape
        x = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
        n = len(lead)
        x = x.permute(*range(n), n, n + 2, n + 3, n + 1, n + 4)  # (..., h/2, w/2, dc, dr, c)
        x = x.reshape(*lead, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


# One table for every size and block layout. "official" is the iTPN release
# (base 3/3/24, large 2/2/40); "mmpretrain" is mmpretrain's iTPN (4/4/24, 4/4/40).
# small is HiViT-S (4/4/20, the same in both). tiny is ours: a CPU-sized model for
# tests and the demo (2.8M encoder parameters), not HiViT-T.
HIVIT_ARCHS = {
    ("tiny", "official"): dict(embed_dim=192, mlp_depths=(1, 1), depth=6, num_heads=3),
    ("small", "official"): dict(embed_dim=384, mlp_depths=(4, 4), depth=20, num_heads=6),
    ("base", "official"): dict(embed_dim=512, mlp_depths=(3, 3), depth=24, num_heads=8),
    ("large", "official"): dict(embed_dim=768, mlp_depths=(2, 2), depth=40, num_heads=12),
    ("tiny", "mmpretrain"): dict(embed_dim=192, mlp_depths=(1, 1), depth=6, num_heads=3),
    ("small", "mmpretrain"): dict(embed_dim=384, mlp_depths=(4, 4), depth=20, num_heads=6),
    ("base", "mmpretrain"): dict(embed_dim=512, mlp_depths=(4, 4), depth=24, num_heads=8),
    ("large", "mmpretrain"): dict(embed_dim=768, mlp_depths=(4, 4), depth=40, num_heads=12),
}


def hivit_arch(size: str, layout: str = "official") -> dict:
    """The HiViT constructor arguments for a named size and block layout."""
    key = (size, layout)
    if key not in HIVIT_ARCHS:
        sizes = sorted({s for s, _ in HIVIT_ARCHS})
        layouts = sorted({l for _, l in HIVIT_ARCHS})
        raise KeyError(f"unknown HiViT arch size={size!r} layout={layout!r}; sizes: {sizes}, layouts: {layouts}")
    d = dict(HIVIT_ARCHS[key])
    d["mlp_depths"] = tuple(d["mlp_depths"])
    return d


class HiViT(nn.Module):
    """The HiViT encoder.

    ``blocks`` is one list, as in the official release: ``mlp_depths[0]`` MLP blocks
    at C/4, a PatchMerge, ``mlp_depths[1]`` MLP blocks at C/2, a PatchMerge, then
    ``depth`` attention blocks at C.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 512,
        mlp_depths: Sequence[int] = (3, 3),
        depth: int = 24,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        stem_mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        pos_embed_trainable: bool = True,
        rel_pos: bool = False,
        layer_scale_init: Optional[float] = None,
        use_act_checkpoint: bool = False,
    ):
        """
        Args:
            embed_dim: width C of the stride-16 stage; stages 1/2 use C/4 and C/2.
            mlp_depths: MLP blocks at stride 4 and stride 8.
            depth: attention blocks at stride 16.
            stem_mlp_ratio: MLP ratio of the stride-4/8 blocks (3 in HiViT).
            drop_path_rate: stochastic depth, linear over all MLP and attention blocks.
            pretrain_img_size: the position embedding is kept at this size
                (``(size/16)^2`` entries) and resized in forward for other inputs.
            pos_embed_trainable: official pixel pre-training trains it, mmpretrain freezes it.
            rel_pos: Swin-style relative position bias per attention block (CLIP variant).
            layer_scale_init: layer-scale init (0.1 in the CLIP variant), None for off.
            use_act_checkpoint: recompute each block in backward to save memory.
        """
        super().__init__()
        assert embed_dim % 4 == 0, f"embed_dim {embed_dim} must be divisible by 4"
        m1, m2 = mlp_depths
        self.embed_dim = embed_dim
        self.mlp_depths = (m1, m2)
        self.depth = depth
        self.unit_size = UNIT_SIZE
        self.use_act_checkpoint = use_act_checkpoint
        self.pretrain_grid = (pretrain_img_size // UNIT_SIZE, pretrain_img_size // UNIT_SIZE)
        self.stage_dims = (embed_dim // 4, embed_dim // 2, embed_dim)

        self.patch_embed = PatchEmbed(in_chans=in_chans, embed_dim=embed_dim // 4)
        gh, gw = self.pretrain_grid
        pos = get_2d_sincos_pos_embed(embed_dim, gh, gw).unsqueeze(0)
        self.absolute_pos_embed = nn.Parameter(pos, requires_grad=pos_embed_trainable)

        n = m1 + m2 + depth
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear, as torch.linspace
        c2_dim, c3_dim, c4_dim = self.stage_dims
        ls = layer_scale_init
        blocks = [
            MlpBlock(dim=c2_dim, mlp_ratio=stem_mlp_ratio, drop_path=dpr[i], layer_scale_init=ls) for i in range(m1)
        ]
        blocks.append(PatchMerge(dim=c2_dim))
        blocks += [
            MlpBlock(dim=c3_dim, mlp_ratio=stem_mlp_ratio, drop_path=dpr[m1 + i], layer_scale_init=ls)
            for i in range(m2)
        ]
        blocks.append(PatchMerge(dim=c3_dim))
        blocks += [
            AttentionBlock(
                dim=c4_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=dpr[m1 + m2 + i],
                layer_scale_init=layer_scale_init,
                rel_pos_grid=self.pretrain_grid if rel_pos else None,
            )
            for i in range(depth)
        ]
        self.blocks = nn.ModuleList(blocks)
        for i, m in enumerate(m for m in self.blocks.modules() if isinstance(m, DropPath)):
            m.layer_id = i  # keys each block's per-sample decisions (itpn_d2.modeling.drop_path)
        self.rel_pos = rel_pos
        self.apply(init_weights)

    @property
    def num_layers(self) -> int:
        """Length of ``blocks`` (MLP blocks, the two merges and the attention blocks)."""
        return len(self.blocks)

    @property
    def attention_blocks(self) -> nn.ModuleList:
        """The ``depth`` attention blocks of the stride-16 stage (the tail of ``blocks``)."""
        m1, m2 = self.mlp_depths
        return self.blocks[m1 + m2 + 2 :]

    def zero_rel_pos_tables(self, grid: int) -> None:
        """Give every attention block a zero relative position bias table for a ``grid x grid``
        unit grid (needs ``rel_pos=True``). Zero is the identity of attention: fine-tuning
        starts from the features of an encoder pre-trained without the bias."""
        if not self.rel_pos:
            raise ValueError("HiViT.zero_rel_pos_tables needs rel_pos=True")
        for blk in self.attention_blocks:
            blk.attn.zero_rel_pos_table(grid)

    def _run(self, blk, *args):
        if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
            return torch_checkpoint.checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Absolute position embedding (1, h*w, C) for a unit grid (h, w)."""
        return resize_pos_embed(self.absolute_pos_embed, self.pretrain_grid, grid)

    def forward(
        self, x: torch.Tensor, ids_keep: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (B, 3, H, W), H and W multiples of 16 (``UNIT_SIZE``).
            ids_keep: optional (B, N_vis) long indices (raster order over the
                (H/16, W/16) unit grid) of the units to keep. Every other unit is
                dropped before the first block, so nothing of it reaches any output.
        Returns:
            c2: (B, N', 4, 4, C/4) stage-1 output (stride 4)
            c3: (B, N', 2, 2, C/2) stage-2 output before the second merge (stride 8)
            c4: (B, N', C) last attention block output (stride 16)
            with N' = N_vis if ids_keep is given else H/16 * W/16.
        """
        B, _, H, W = x.shape
        u = self.unit_size
        if H % u or W % u:
            raise ValueError(f"HiViT input must be a multiple of {u} pixels on each side; got {H}x{W}")
        grid = (H // u, W // u)
        x = self.patch_embed(x, ids_keep)  # masked units are dropped before the projection

        m1, m2 = self.mlp_depths
        for blk in self.blocks[:m1]:
            x = self._run(blk, x)
        c2 = x
        x = self.blocks[m1](x)
        for blk in self.blocks[m1 + 1 : m1 + 1 + m2]:
            x = self._run(blk, x)
        c3 = x
        x = self.blocks[m1 + 1 + m2](x)[..., 0, 0, :]  # (B, N', C)

        pos = self.pos_embed_for(grid)
        if ids_keep is not None:
            pos = torch.gather(pos.expand(B, -1, -1), 1, ids_keep[:, :, None].expand(-1, -1, pos.shape[-1]))
        x = x + pos

        rel_index = None
        if self.rel_pos:
            rel_index = relative_position_index(*grid, device=x.device)
            if ids_keep is not None:
                rel_index = rel_index[ids_keep[:, :, None], ids_keep[:, None, :]]  # (B, L, L)
        for blk in self.attention_blocks:
            x = self._run(blk, x, rel_index, grid)
        return c2, c3, x
