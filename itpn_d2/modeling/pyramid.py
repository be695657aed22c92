"""The iTPN feature pyramid: C-MLP blocks and PatchSplit, top-down 16 -> 8 -> 4.

No convolutions: every operation is per token or inside one mask unit, so the
pyramid keeps HiViT's property that a masked unit cannot leak into a visible one,
and the same module (same weights, same names) serves pre-training and the
detection / segmentation necks.

Parameter names follow the official iTPN release (``align_dim_16tofpn``,
``split_16to8``, ``block_16to8``, ``fpn_modules`` ...).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .layers import MlpBlock, init_weights, layer_norm

__all__ = ["PatchSplit", "FeaturePyramid"]


class PatchSplit(nn.Module):
    """Learned 2x up-sampling inside each unit.

    (B, N, h, w, C) -> LN -> Linear(C -> 4*D) -> (B, N, 2h, 2w, D): each token
    becomes the 2x2 sub-tokens it covers at the next finer stride.
    """

    def __init__(self, *, dim: int, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.norm = layer_norm(dim)
        self.reduction = nn.Linear(dim, 4 * out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, h, w, _ = x.shape
        x = self.reduction(self.norm(x))
        # The 4*D outputs are (sub-row, sub-col, D): interleave them with (h, w).
        x = x.view(B, N, h, w, 2, 2, self.out_dim).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, N, 2 * h, 2 * w, self.out_dim)


class FeaturePyramid(nn.Module):
    """Top-down fusion of HiViT's c2/c3/c4 (strides 4/8/16) into ``out_dim`` channels.

    p4 = Linear(c4)
    p3 = C-MLPs(PatchSplit(c4) + Linear(c3))
    p2 = C-MLPs(PatchSplit(p3) + Linear(c2))
    then one more C-MLP per level (``fpn_modules[0..2]`` for p4, p3, p2). The parameter
    names count strides (``16to8``: from stride 16 to stride 8), as in the release.
    """

    def __init__(self, *, embed_dim: int = 512, out_dim: int = 256, depth: int = 2, mlp_ratio: float = 4.0):
        """
        Args:
            embed_dim: HiViT's width C; its stride-4, 8, 16 features have C/4, C/2, C
                channels.
            out_dim: channels of every pyramid level (256 in the paper).
            depth: C-MLP blocks after each top-down fusion (``fpn_depth``: 2 in
                pixel pre-training, 1 in the official detection configs).
            mlp_ratio: hidden width of the C-MLPs relative to ``out_dim``.
        """
        super().__init__()
        c2_dim, c3_dim, c4_dim = embed_dim // 4, embed_dim // 2, embed_dim
        self.in_dims = (c2_dim, c3_dim, c4_dim)
        self.out_dim = out_dim
        self.depth = depth

        def cmlps(n):
            return nn.Sequential(*[MlpBlock(dim=out_dim, mlp_ratio=mlp_ratio) for _ in range(n)])

        self.align_dim_16tofpn = nn.Linear(c4_dim, out_dim)
        self.split_16to8 = PatchSplit(dim=c4_dim, out_dim=out_dim)
        self.align_dim_16to8 = nn.Linear(c3_dim, out_dim, bias=False)
        self.block_16to8 = cmlps(depth)
        self.split_8to4 = PatchSplit(dim=out_dim, out_dim=out_dim)
        self.align_dim_8to4 = nn.Linear(c2_dim, out_dim, bias=False)
        self.block_8to4 = cmlps(depth)
        self.fpn_modules = nn.ModuleList([MlpBlock(dim=out_dim, mlp_ratio=mlp_ratio) for _ in range(3)])
        self.apply(init_weights)

    def forward(
        self, c2: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor, *, with_p2: bool = True
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """
        Args:
            c2: (B, N, 4, 4, C/4), c3: (B, N, 2, 2, C/2), c4: (B, N, C) from HiViT.
            with_p2: False skips the stride-4 level (returned as None). It holds 16 of every
                unit's 21 pyramid tokens, so it is most of the pyramid's cost (the tiny model on
                two 160x192 images: 10.4 ms with it, 2.0 ms without); a head that does not
                read p2 does not need it.
        Returns:
            (p2, p3, p4): (B, N, 4, 4, D) or None, (B, N, 2, 2, D), (B, N, 1, 1, D).
        """
        # With p2 the operations run in the order they always had: a CPU matmul's last bits can
        # depend on where its buffers land, so the same seed keeps giving the same checkpoints.
        c4 = c4[:, :, None, None, :]
        fused_p4 = self.align_dim_16tofpn(c4)
        fused_p3 = self.block_16to8(self.split_16to8(c4) + self.align_dim_16to8(c3))
        fused_p2 = self.block_8to4(self.split_8to4(fused_p3) + self.align_dim_8to4(c2)) if with_p2 else None
        p4 = self.fpn_modules[0](fused_p4)
        p3 = self.fpn_modules[1](fused_p3)
        p2 = self.fpn_modules[2](fused_p2) if with_p2 else None
        return p2, p3, p4
