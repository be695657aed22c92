"""Parameters and FLOPs of an iTPN model, per part: what ``tools/analyze_model.py`` prints.

Parameters are fvcore's ``parameter_count``; FLOPs are counted as everywhere in this
repository (:mod:`itpn_d2.utils.flops`: 2 FLOPs per multiply-add).
"""
from typing import Dict, List, Tuple

import torch
from fvcore.nn import parameter_count

from itpn_d2.modeling import FeaturePyramid, HiViT, hivit_arch
from itpn_d2.utils.flops import forward_flops

__all__ = ["format_millions", "param_table", "backbone_parts", "backbone_flops"]


def format_millions(n: float) -> str:
    """``12345678`` -> ``"12.35M"``."""
    return f"{n / 1e6:.2f}M"


def param_table(model: torch.nn.Module, depth: int) -> List[Tuple[str, int]]:
    """Rows (name, params) for every module prefix up to ``depth`` dots, plus the total.

    Numbered children (the blocks of a ``ModuleList``) are left out: their parent's row
    holds them, and one row per block would drown the table."""
    counts = parameter_count(model)
    rows = [("(total)", counts[""])]
    for name, n in counts.items():
        if name and name.count(".") < depth and not name.split(".")[-1].isdigit():
            if any(p.startswith(name + ".") or p == name for p, _ in model.named_parameters()):
                rows.append((name, n))
    return rows


def backbone_parts(
    *, size: str, layout: str, fpn_dim: int, fpn_depth: int, decoder_depth: int = 0
) -> Tuple[dict, Dict[str, torch.nn.Module]]:
    """The HiViT arch of ``size`` / ``layout`` and its parts in eval mode, by display name:
    the encoder, the feature pyramid and, with ``decoder_depth`` > 0, a pixel decoder."""
    from itpn_d2.modeling.decoder import PixelDecoder

    arch = hivit_arch(size, layout)
    net = HiViT(**arch, pretrain_img_size=224).eval()
    pyramid = FeaturePyramid(embed_dim=net.embed_dim, out_dim=fpn_dim, depth=fpn_depth).eval()
    parts = {"encoder (HiViT)": net, f"pyramid (fpn_depth {fpn_depth})": pyramid}
    if decoder_depth > 0:
        parts[f"pixel decoder ({decoder_depth} blocks)"] = PixelDecoder(in_dim=fpn_dim, depth=decoder_depth).eval()
    return arch, parts


def backbone_flops(net: HiViT, pyramid: FeaturePyramid, input_size: int) -> Tuple[int, int]:
    """FLOPs of one unmasked forward pass of the encoder and of the pyramid on its output,
    at ``input_size`` x ``input_size``."""
    x = torch.zeros(1, 3, input_size, input_size)
    enc = forward_flops(net, x)
    with torch.no_grad():
        feats = net(x)
    return enc, forward_flops(pyramid, *feats)
