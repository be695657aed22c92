"""itpn_d2.checkpoint.convert and tools/convert_pretrained.py: official / mmpretrain layouts -> ours,
checked by equal outputs."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from itpn_d2.checkpoint import BackboneLoadError, ITPNCheckpointer
from itpn_d2.checkpoint import convert as conv
from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone, hivit_arch
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
TOOL = os.path.join(ROOT, "tools", "convert_pretrained.py")


def convert_cli(*argv: str) -> subprocess.CompletedProcess:
    """The command line, as a user runs it."""
    return subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, timeout=120)


def load_init_checkpoint(model, path):
    """Strict, as tools/lazyconfig_train_net.py loads ``train.init_checkpoint``."""
    ITPNCheckpointer(model).resume_or_load(path, resume=False)


def _source_model(mlp_depths=(1, 1), fpn_depth=2, rel_pos=False, layer_scale=None, img=224, seed=0):
    torch.manual_seed(seed)
    arch = hivit_arch("tiny")
    arch["mlp_depths"] = mlp_depths
    net = HiViT(**arch, rel_pos=rel_pos, layer_scale_init=layer_scale, pretrain_img_size=img)
    bb = ITPNBackbone(net=net, pyramid=FeaturePyramid(embed_dim=net.embed_dim, out_dim=64, depth=fpn_depth))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move LN / biases / pos embed away from their trivial init
        for p in bb.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return bb.eval()


# Inverse maps, written from the release / mmpretrain sources, independent of the converter's table.
def to_official(bb):
    sd = {}
    for k, v in bb.state_dict().items():
        name = k[len("net.") :] if k.startswith("net.") else k[len("pyramid.") :]
        sd["module." + name] = v.clone()
    sd["module.mask_token"] = torch.zeros(1, 1, 32)
    sd["module.decoder_embed.0.0.weight"] = torch.ones(64)
    sd["module.decoder_blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
    sd["module.decoder_pred.weight"] = torch.zeros(768, 32)
    return {"model": sd, "args": argparse.Namespace(model="itpn_tiny", epochs=1600)}


def to_mmpretrain(bb):
    sd = {}
    for k, v in bb.state_dict().items():
        if k == "net.absolute_pos_embed":
            sd["backbone.pos_embed"] = v.clone()
        elif k.startswith("net."):
            sd["backbone." + k[4:]] = v.clone()
        else:
            sd["neck." + k[len("pyramid.") :]] = v.clone()
    sd["neck.decoder_blocks.0.ln1.weight"] = torch.ones(32)
    sd["neck.mask_token"] = torch.zeros(1, 1, 32)
    sd["neck.decoder_pos_embed"] = torch.zeros(1, 196, 32)
    sd["neck.ln1.weight"] = torch.ones(32)
    sd["neck.decoder_pred.bias"] = torch.zeros(768)
    sd["backbone.relative_position_index"] = torch.zeros(196, 196, dtype=torch.long)
    return {"state_dict": sd, "meta": {"epoch": 800, "mmengine_version": "0.10.7"}}


def _fresh_from(path, info, seed=123):
    a = info["arch"]
    torch.manual_seed(seed)
    arch = hivit_arch("tiny")
    arch["mlp_depths"] = tuple(a["mlp_depths"])
    net = HiViT(**arch, rel_pos=a["rel_pos"], layer_scale_init=0.5 if a["layer_scale"] else None)
    bb = ITPNBackbone(net=net, pyramid=FeaturePyramid(embed_dim=net.embed_dim, out_dim=64, depth=a["fpn_depth"]))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = bb

    load_init_checkpoint(Holder(), path)  # strict
    return bb.eval()


def _assert_same_outputs(src, dst, size=(64, 96)):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = src.net(x), dst.net(x)
        for t, u in zip(a, b):
            torch.testing.assert_close(t, u, atol=1e-6, rtol=0)
        for t, u in zip(src.pyramid(*a), dst.pyramid(*b)):
            torch.testing.assert_close(t, u, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout,mlp", [("official", (1, 1)), ("mmpretrain", (2, 2))])
def test_round_trip(tmp_path, layout, mlp):
    src = _source_model(mlp_depths=mlp)
    packed = to_official(src) if layout == "official" else to_mmpretrain(src)
    inp, out = str(tmp_path / "src.pth"), str(tmp_path / "ours.pth")
    torch.save(packed, inp)
    info = conv.convert_file(inp, out)
    assert info["source"] == layout
    assert tuple(info["arch"]["mlp_depths"]) == mlp and info["arch"]["depth"] == 6
    assert info["arch"]["embed_dim"] == 192 and info["arch"]["fpn_depth"] == 2
    # (2, 2) tiny is in no table row: reported as unnamed, heads guessed as C/64 (= 3, right here)
    assert info["arch"]["size"] == ("tiny" if mlp == (1, 1) else None) and info["arch"]["num_heads"] == 3
    assert "mask_token" in str(info["dropped"]) and "decoder" in str(info["dropped"])
    saved = torch.load(out, weights_only=True)  # tensors only: loads under torch's safe default
    assert saved["matching_heuristics"] is False and "__author__" in saved
    assert all(k.startswith(("backbone.net.", "backbone.pyramid.")) for k in saved["model"])
    dst = _fresh_from(out, info)
    _assert_same_outputs(src, dst)


def test_clip_variant_rpe_layer_scale_and_pos_resize(tmp_path):
    # pre-trained at 256 px (16x16 units): APE and RPE tables are resized to the 14x14 grid.
    src = _source_model(rel_pos=True, layer_scale=0.1, img=256)
    inp, out = str(tmp_path / "clip.pth"), str(tmp_path / "ours.pth")
    torch.save(to_official(src), inp)
    info = conv.convert_file(inp, out)
    a = info["arch"]
    assert a["rel_pos"] and a["layer_scale"] and a["num_heads"] == 3 and a["pos_tokens"] == 196
    sd = torch.load(out, weights_only=True)["model"]
    assert sd["backbone.net.absolute_pos_embed"].shape == (1, 196, 192)
    assert sd["backbone.net.blocks.4.attn.relative_position_bias_table"].shape == (27 * 27, 3)
    dst = _fresh_from(out, info)
    _assert_same_outputs(src, dst, size=(224, 224))  # the source resizes at run time to the same grid


def test_fpn_depth_drop_and_refuse(tmp_path):
    src = _source_model(fpn_depth=2)
    inp = str(tmp_path / "src.pth")
    torch.save(to_official(src), inp)
    out = str(tmp_path / "d1.pth")
    info = conv.convert_file(inp, out, fpn_depth=1)
    assert any("pyramid depth 2 -> 1" in w for w in info["warnings"])
    sd = torch.load(out, weights_only=True)["model"]
    assert not any(".block_16to8.1." in k or ".block_8to4.1." in k for k in sd)
    _fresh_from(out, info)  # loads strictly into a depth-1 pyramid
    with pytest.raises(conv.ConversionError, match="fpn-depth 3"):
        conv.convert_file(inp, str(tmp_path / "d3.pth"), fpn_depth=3)
    assert not os.path.exists(tmp_path / "d3.pth")


@pytest.mark.slow
def test_wrong_architecture_refused_with_keys(tmp_path):
    src = _source_model(mlp_depths=(2, 2))
    inp, out = str(tmp_path / "src.pth"), str(tmp_path / "out.pth")
    torch.save(to_mmpretrain(src), inp)
    # the converter, told to expect another arch, lists the keys and writes nothing
    with pytest.raises(BackboneLoadError) as e:
        conv.convert_file(inp, out, expect=("small", "official"))
    msg = str(e.value)
    assert "backbone.net.patch_embed.proj.weight: (48, 3, 4, 4) vs (96, 3, 4, 4)" in msg
    assert not os.path.exists(out)
    proc = convert_cli(inp, out, "--size", "small")
    assert proc.returncode == 1 and "ERROR" in proc.stderr and "patch_embed.proj.weight" in proc.stderr
    assert not os.path.exists(out)
    # converted fine, but a 2/2 file is refused by a 1/1 (official tiny) model
    info = conv.convert_file(inp, out)
    holder = nn.Module()
    holder.backbone = _source_model(mlp_depths=(1, 1))
    with pytest.raises(BackboneLoadError, match=r"backbone\.net\.blocks\.2\.reduction\.weight"):
        load_init_checkpoint(holder, out)


@pytest.mark.slow
def test_cli_and_unknown_layout(tmp_path):
    src = _source_model()
    inp, out = str(tmp_path / "src.pth"), str(tmp_path / "cli.pth")
    torch.save(to_official(src), inp)
    proc = convert_cli(inp, out, "--size", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert '"source": "official"' in proc.stdout and os.path.exists(out)
    bad = str(tmp_path / "bad.pth")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, bad)
    with pytest.raises(conv.ConversionError, match="cannot tell the checkpoint layout"):
        conv.convert_file(bad, str(tmp_path / "x.pth"))
