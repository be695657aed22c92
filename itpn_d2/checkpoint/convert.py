"""Conversion of iTPN pre-trained weights to itpn_d2's key layout (``tools/convert_pretrained.py``).

Sources (auto-detected from the key names by :func:`detect_source`, or given):

* ``official``: the iTPN release (github sunsmarterjie/iTPN), ``{'model': sd, 'args': Namespace}``,
  keys ``patch_embed.*``, ``absolute_pos_embed``, ``blocks.i.*``, ``align_dim_16tofpn.*``,
  ``split_16to8.*``, ``block_16to8.j.*``, ``fpn_modules.k.*`` ... (possibly under ``module.``).
* ``mmpretrain``: mmpretrain's iTPN / HiViT (``{'state_dict': sd, 'meta': ...}``), keys
  ``backbone.patch_embed.*``, ``backbone.pos_embed``, ``backbone.blocks.i.*`` and the pyramid under
  ``neck.*`` (``neck.align_dim_16tofpn``, ``neck.block_16to8.j`` ...).
* ``itpn_d2``: already ours (``backbone.net.*``, ``backbone.pyramid.*``); re-checked and re-written.

Output of :func:`convert_file`: ``{"model": sd, "__author__": ..., "matching_heuristics": False,
"itpn_arch": {...}}`` with keys ``backbone.net.*`` and ``backbone.pyramid.*`` only, loadable by
``ITPNCheckpointer`` / ``DetectionCheckpointer`` with ``weights_only=True``.

What the conversion does, and decides:

* Renames: ``pos_embed`` -> ``absolute_pos_embed``; encoder keys -> ``backbone.net.``; pyramid keys
  -> ``backbone.pyramid.``. Pre-training-only tensors (decoder, mask token, decoder position
  embedding, CLIP heads and teacher, classifier heads) and the ``relative_position_index``
  buffers (recomputed by our model) are dropped and listed.
* Block indices are kept. Both layouts store the encoder as one list (m1 MLP blocks, PatchMerge,
  m2 MLP blocks, PatchMerge, attention blocks) in the same order as our ``HiViT.blocks``, so an
  official 3/3/24 file and an mmpretrain 4/4/24 file map index for index; what differs is the
  arch, which is read from the shapes (:func:`detect_arch`: ``mlp_depths`` from where the
  PatchMerges sit) and reported: build the model with that ``hivit_arch(size, layout)``. A 4/4
  file is never squeezed into a 3/3 model (that would silently drop pre-trained blocks):
  ``ITPNCheckpointer`` refuses it.
* Pyramid depth: kept by default (our configs use the pre-training depth, 2). ``fpn_depth=N``
  with N smaller than the file's depth drops ``block_16to8.j`` / ``block_8to4.j`` for j >= N with
  a warning (the official detection setting, N=1); N larger than the file's depth is refused,
  since the extra blocks would be random.
* Position embedding: resized (bicubic, :func:`~itpn_d2.modeling.pos_embed.resize_pos_embed`) to
  ``pos_grid`` (14x14, i.e. 224 px, the grid our configs build) when the file's differs. Relative
  position bias tables (CLIP variant) are resized by
  :func:`~itpn_d2.modeling.pos_embed.resize_rel_pos_table`, the function ``Attention`` uses at run
  time, so at a 224-px input the converted model computes what the source model computed.
* Checks (:func:`verify`): the result must load with ``strict=True`` into an ``ITPNBackbone``
  built from the detected arch; with ``expect=(size, layout)`` it must also match that arch, else
  the mismatched keys are listed and nothing is written.
"""
import logging
import os
import re
from collections import defaultdict
from typing import Dict, Optional, Tuple

import torch

from ..modeling.backbone import ITPNBackbone
from ..modeling.hivit import HIVIT_ARCHS, HiViT, hivit_arch
from ..modeling.pos_embed import resize_pos_embed, resize_rel_pos_table
from ..modeling.pyramid import FeaturePyramid
from .errors import BackboneLoadError
from .key_report import compare_state_dicts, format_key_report
from .safe_load import extract_state_dict, load_checkpoint_file

__all__ = [
    "ConversionError",
    "SOURCES",
    "build_backbone",
    "convert_file",
    "convert_state_dict",
    "detect_arch",
    "detect_source",
    "verify",
]

logger = logging.getLogger(__name__)

PYRAMID_MODULES = (
    "align_dim_16tofpn",
    "split_16to8",
    "align_dim_16to8",
    "block_16to8",
    "split_8to4",
    "align_dim_8to4",
    "block_8to4",
    "fpn_modules",
)
ENCODER_MODULES = ("patch_embed", "absolute_pos_embed", "blocks")
SOURCES = ("official", "mmpretrain", "itpn_d2")


class ConversionError(ValueError):
    """A source file the converter cannot map onto itpn_d2's layout; nothing is written."""


def detect_source(sd: Dict[str, torch.Tensor]) -> str:
    """``"official"``, ``"mmpretrain"`` or ``"itpn_d2"``: the layout a state dict's key names follow."""
    keys = list(sd)
    if any(k.startswith("backbone.net.") for k in keys):
        return "itpn_d2"
    if any(k.startswith("backbone.patch_embed.") for k in keys):
        return "mmpretrain"
    if any(k.startswith("patch_embed.") for k in keys):
        return "official"
    raise ConversionError(
        "cannot tell the checkpoint layout: no 'patch_embed.*' (official), 'backbone.patch_embed.*' "
        f"(mmpretrain) or 'backbone.net.*' (itpn_d2) keys. First keys: {keys[:10]}"
    )


def _target_name(key: str, source: str) -> Optional[str]:
    """Our name for a source key, or None if the tensor is not part of the backbone."""
    if key.endswith("relative_position_index"):
        return None  # a buffer our model recomputes
    if source == "itpn_d2":
        return key if key.startswith(("backbone.net.", "backbone.pyramid.")) else None
    if source == "official":
        enc, pyr = key, key
    else:  # mmpretrain: encoder under backbone., pyramid under neck.
        enc = key[len("backbone.") :] if key.startswith("backbone.") else None
        pyr = key[len("neck.") :] if key.startswith("neck.") else None
        if enc == "pos_embed":
            enc = "absolute_pos_embed"
    if enc is not None and enc.split(".")[0] in ENCODER_MODULES:
        return "backbone.net." + enc
    if pyr is not None and pyr.split(".")[0] in PYRAMID_MODULES:
        return "backbone.pyramid." + pyr
    return None


def detect_arch(sd: Dict[str, torch.Tensor]) -> dict:
    """Read the HiViT / pyramid arch of a state dict in our layout from its key shapes."""
    p = "backbone.net."
    if p + "patch_embed.proj.weight" not in sd:
        raise ConversionError(f"no {p}patch_embed.proj.weight: not an iTPN / HiViT checkpoint")
    embed_dim = sd[p + "patch_embed.proj.weight"].shape[0] * 4
    parts = defaultdict(set)
    for k in sd:
        m = re.match(r"backbone\.net\.blocks\.(\d+)\.([^.]+)", k)
        if m:
            parts[int(m.group(1))].add(m.group(2))
    kinds = {i: ("merge" if "reduction" in s else "attn" if "attn" in s else "mlp") for i, s in parts.items()}
    n = len(kinds)
    if sorted(kinds) != list(range(n)):
        raise ConversionError(f"block indices are not contiguous: {sorted(kinds)}")
    merges = [i for i in range(n) if kinds[i] == "merge"]
    if len(merges) != 2:
        raise ConversionError(f"expected 2 PatchMerge blocks, found them at {merges}")
    m1, m2 = merges[0], merges[1] - merges[0] - 1
    depth = n - merges[1] - 1
    if any(kinds[i] != "attn" for i in range(merges[1] + 1, n)) or any(
        kinds[i] != "mlp" for i in range(n) if i < merges[1] and i not in merges
    ):
        raise ConversionError(f"unexpected block order: {[kinds[i] for i in range(n)]}")
    first_attn = f"{p}blocks.{merges[1] + 1}."
    rel_pos = (first_attn + "attn.relative_position_bias_table") in sd
    layer_scale = (first_attn + "gamma_1") in sd

    size = layout = None
    num_heads, heads_from = None, None
    for (s, l), a in HIVIT_ARCHS.items():
        if a["embed_dim"] == embed_dim and tuple(a["mlp_depths"]) == (m1, m2) and a["depth"] == depth:
            size, layout, num_heads, heads_from = s, l, a["num_heads"], "arch table"
            break
    if rel_pos:
        num_heads, heads_from = sd[first_attn + "attn.relative_position_bias_table"].shape[1], "relative position table"
    if num_heads is None:
        num_heads, heads_from = max(1, embed_dim // 64), "guessed embed_dim/64 (no table entry; pass --num-heads)"

    q = "backbone.pyramid."
    has_pyramid = any(k.startswith(q) for k in sd)
    fpn_depth = len({k.split(".")[3] for k in sd if k.startswith(q + "block_16to8.")})
    fpn_dim = sd[q + "align_dim_16tofpn.weight"].shape[0] if (q + "align_dim_16tofpn.weight") in sd else None
    pos = sd.get(p + "absolute_pos_embed")
    return dict(
        size=size,
        layout=layout,
        embed_dim=embed_dim,
        mlp_depths=(m1, m2),
        depth=depth,
        num_heads=int(num_heads),
        num_heads_from=heads_from,
        rel_pos=rel_pos,
        layer_scale=layer_scale,
        has_pyramid=has_pyramid,
        fpn_depth=fpn_depth,
        fpn_dim=fpn_dim,
        pos_tokens=None if pos is None else pos.shape[1],
    )


def build_backbone(arch: dict, pretrain_img_size: int = 224, layer_scale_init: float = 0.1) -> ITPNBackbone:
    """An ``ITPNBackbone`` with the given (detected) arch; pyramid depth 0 is not allowed."""
    net = HiViT(
        embed_dim=arch["embed_dim"],
        mlp_depths=tuple(arch["mlp_depths"]),
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        pretrain_img_size=pretrain_img_size,
        rel_pos=arch["rel_pos"],
        layer_scale_init=layer_scale_init if arch["layer_scale"] else None,
    )
    pyramid = FeaturePyramid(embed_dim=arch["embed_dim"], out_dim=arch["fpn_dim"] or 256, depth=max(1, arch["fpn_depth"]))
    return ITPNBackbone(net=net, pyramid=pyramid)


def convert_state_dict(
    sd: Dict[str, torch.Tensor],
    source: str = "auto",
    fpn_depth: Optional[int] = None,
    pos_grid: Tuple[int, int] = (14, 14),
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Rename / reshape a source state dict into our layout.

    Returns:
        (state dict with ``backbone.net.*`` / ``backbone.pyramid.*`` keys, info dict with
        ``source``, ``arch``, ``dropped`` (grouped counts), ``warnings``).
    """
    if source == "auto":
        source = detect_source(sd)
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; choose from {SOURCES} or 'auto'")
    out, dropped, warnings = {}, [], []
    for k, v in sd.items():
        t = _target_name(k, source)
        if t is None:
            dropped.append(k)
        elif t in out:
            raise ConversionError(f"two source keys map to {t}")
        else:
            out[t] = v.detach().clone()
    if not any(k.startswith("backbone.net.") for k in out):
        raise ConversionError(f"no encoder tensors found for source layout {source!r}")

    arch = detect_arch(out)
    # Pyramid depth.
    if fpn_depth is not None and arch["has_pyramid"]:
        src_depth = arch["fpn_depth"]
        if fpn_depth > src_depth:
            raise ConversionError(
                f"--fpn-depth {fpn_depth} > the checkpoint's pyramid depth {src_depth}: the extra C-MLP "
                "blocks would be random; build the model with the checkpoint's depth instead"
            )
        if fpn_depth < src_depth:
            extra = sorted(
                k
                for k in out
                if re.match(r"backbone\.pyramid\.block_(16to8|8to4)\.(\d+)\.", k)
                and int(k.split(".")[3]) >= fpn_depth
            )
            for k in extra:
                del out[k]
            warnings.append(
                f"pyramid depth {src_depth} -> {fpn_depth}: dropped {len(extra)} pre-trained tensors of "
                f"block_16to8.j / block_8to4.j with j >= {fpn_depth}"
            )
            arch["fpn_depth"] = fpn_depth
    if not arch["has_pyramid"]:
        warnings.append(
            "the checkpoint holds no pyramid (a classification or encoder-only file): load it with "
            "backbone_load='encoder_only' (train.backbone_load=encoder_only)"
        )
    # Identity projection where the source had none (mmpretrain/official skip it when C == fpn_dim).
    q = "backbone.pyramid."
    if arch["has_pyramid"] and (q + "align_dim_16tofpn.weight") not in out:
        C = arch["embed_dim"]
        out[q + "align_dim_16tofpn.weight"] = torch.eye(C)
        out[q + "align_dim_16tofpn.bias"] = torch.zeros(C)
        arch["fpn_dim"] = C
        warnings.append("no align_dim_16tofpn (embed_dim == fpn_dim): wrote an identity Linear")

    # Position embedding and relative position tables at the target grid.
    pk = "backbone.net.absolute_pos_embed"
    if pk in out:
        L = out[pk].shape[1]
        s = int(round(L**0.5))
        if s * s != L:
            raise ConversionError(f"{pk} has {L} tokens, not a square grid")
        if (s, s) != tuple(pos_grid):
            out[pk] = resize_pos_embed(out[pk], (s, s), tuple(pos_grid)).contiguous()
            warnings.append(f"absolute position embedding resized {s}x{s} -> {pos_grid[0]}x{pos_grid[1]}")
    for k in [k for k in out if k.endswith("attn.relative_position_bias_table")]:
        before = out[k].shape[0]
        side = int(round(before**0.5))
        if side * side != before or side % 2 == 0:
            raise ConversionError(f"relative position table {k} of {before} rows is not (2S-1)^2 for a grid side S")
        src_grid = ((side + 1) // 2,) * 2
        out[k] = resize_rel_pos_table(out[k], src_grid, tuple(pos_grid)).contiguous()
        if out[k].shape[0] != before:
            warnings.append(f"{k}: resized {before} -> {out[k].shape[0]} rows")
    arch["pos_tokens"] = out[pk].shape[1] if pk in out else None

    groups = defaultdict(int)
    for k in dropped:
        parts = k.split(".")
        groups[".".join(parts[:2]) if parts[0] in ("backbone", "neck", "head") else parts[0]] += 1
    return out, dict(source=source, arch=arch, dropped=dict(sorted(groups.items())), warnings=warnings)


def verify(sd: Dict[str, torch.Tensor], arch: dict, expect: Optional[Tuple[str, str]] = None) -> ITPNBackbone:
    """Load ``sd`` strictly into an ITPNBackbone of ``arch`` (and of ``expect`` = (size, layout) if given).

    Raises:
        BackboneLoadError listing the mismatched keys.
    """
    pos_tokens = arch.get("pos_tokens") or 196
    img = int(round(pos_tokens**0.5)) * 16
    if expect is not None:
        ref = dict(hivit_arch(*expect))
        want = dict(arch, embed_dim=ref["embed_dim"], mlp_depths=ref["mlp_depths"], depth=ref["depth"], num_heads=ref["num_heads"])
        model_sd = {"backbone." + k: v for k, v in build_backbone(want, img).state_dict().items()}
        prefixes = ("backbone.net.", "backbone.pyramid.") if arch["has_pyramid"] else ("backbone.net.",)
        missing, mismatched, unexpected = compare_state_dicts(model_sd, sd, prefixes)
        if missing or mismatched or unexpected:
            raise BackboneLoadError(
                f"the checkpoint is not a {expect[0]}/{expect[1]} HiViT (detected embed_dim={arch['embed_dim']}, "
                f"mlp_depths={arch['mlp_depths']}, depth={arch['depth']}):\n"
                + format_key_report(missing, mismatched, unexpected)
            )
    bb = build_backbone(arch, img)
    local = {k[len("backbone.") :]: v for k, v in sd.items()}
    if arch["has_pyramid"]:
        bb.load_state_dict(local, strict=True)
    else:
        bb.net.load_state_dict({k[len("net.") :]: v for k, v in local.items()}, strict=True)
    return bb


def convert_file(
    src: str,
    dst: str,
    source: str = "auto",
    fpn_depth: Optional[int] = None,
    pos_grid: Tuple[int, int] = (14, 14),
    expect: Optional[Tuple[str, str]] = None,
    allow_unsafe: Optional[bool] = None,
) -> dict:
    """Convert ``src`` to ``dst``; returns the info dict (also logged). Nothing is written on error."""
    obj = load_checkpoint_file(src, allow_unsafe=allow_unsafe)
    sd = extract_state_dict(obj, src)
    out, info = convert_state_dict(sd, source=source, fpn_depth=fpn_depth, pos_grid=pos_grid)
    verify(out, info["arch"], expect)
    arch = info["arch"]
    for w in info["warnings"]:
        logger.warning(w)
    logger.info(
        f"{src}: {info['source']} layout, detected size={arch['size']} layout={arch['layout']} "
        f"embed_dim={arch['embed_dim']} mlp_depths={arch['mlp_depths']} depth={arch['depth']} "
        f"num_heads={arch['num_heads']} ({arch['num_heads_from']}) rel_pos={arch['rel_pos']} "
        f"layer_scale={arch['layer_scale']} pyramid={arch['has_pyramid']} fpn_depth={arch['fpn_depth']}"
    )
    if info["dropped"]:
        logger.info("dropped (not part of the backbone): " + ", ".join(f"{k} ({n})" for k, n in info["dropped"].items()))
    arch_meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(
        {
            "model": out,
            "__author__": f"itpn_d2 tools/convert_pretrained.py from {os.path.basename(src)} ({info['source']} layout)",
            "matching_heuristics": False,
            "itpn_arch": arch_meta,
        },
        dst,
    )
    logger.info(f"wrote {dst}: {sum(k.startswith('backbone.net.') for k in out)} encoder and "
                f"{sum(k.startswith('backbone.pyramid.') for k in out)} pyramid tensors")
    return info


