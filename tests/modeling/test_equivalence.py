"""The optimised paths agree with straightforward implementations written here.

Each naive version is the textbook form (explicit loops / index lists, conv then
regroup, softmax(QK^T)V) and shares the module's weights; fp32 results must match to
float rounding, bf16-autocast results to bf16 rounding.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from itpn_d2.modeling import FeaturePyramid, HiViT, hivit_arch, map_to_units, units_to_map
from itpn_d2.modeling.decoder import PixelDecoder
from itpn_d2.modeling.hivit import PatchEmbed, PatchMerge
from itpn_d2.modeling.layers import Attention
from itpn_d2.modeling.pyramid import PatchSplit
from itpn_d2.utils.precision import cpu_has_native_bf16
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT


def naive_attention(attn: Attention, x, bias=None):
    B, L, C = x.shape
    h = attn.num_heads
    d = C // h
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    q, k, v = (t.reshape(B, L, h, d).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / d**0.5
    if bias is not None:
        s = s + bias
    o = s.softmax(-1) @ v
    o = o.transpose(1, 2).reshape(B, L, C)
    return o @ attn.proj.weight.T + attn.proj.bias


def naive_patch_embed(pe: PatchEmbed, x, ids_keep=None):
    """Conv2d on the whole image, then pixel by pixel into units, then gather, then LN."""
    f = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride)  # (B, c, H/4, W/4)
    B, c, h4, w4 = f.shape
    i = pe.inner
    hu, wu = h4 // i, w4 // i
    out = torch.empty(B, hu * wu, i, i, c)
    for r in range(hu):
        for cc in range(wu):
            for a in range(i):
                for b in range(i):
                    out[:, r * wu + cc, a, b] = f[:, :, r * i + a, cc * i + b]
    if ids_keep is not None:
        out = torch.stack([out[bi, ids_keep[bi]] for bi in range(B)])
    return pe.norm(out)


def naive_patch_merge(pm: PatchMerge, x):
    """Explicit index lists: output (i, j) concatenates inputs (2i+dr, 2j+dc) in the order
    (dr, dc) = (0,0), (1,0), (0,1), (1,1)."""
    *lead, h, w, c = x.shape
    out = x.new_empty(*lead, h // 2, w // 2, 4 * c)
    for i in range(h // 2):
        for j in range(w // 2):
            parts = [x[..., 2 * i + dr, 2 * j + dc, :] for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1))]
            out[..., i, j, :] = torch.cat(parts, -1)
    return pm.reduction(pm.norm(out))


def naive_patch_split(ps: PatchSplit, x):
    """Output sub-token (2i+a, 2j+b) is slice (2a+b) of the 4*D projection of token (i, j)."""
    y = ps.reduction(ps.norm(x))
    B, N, h, w, _ = x.shape
    D = ps.out_dim
    out = y.new_empty(B, N, 2 * h, 2 * w, D)
    for i in range(h):
        for j in range(w):
            for a in range(2):
                for b in range(2):
                    k = 2 * a + b
                    out[:, :, 2 * i + a, 2 * j + b] = y[:, :, i, j, k * D : (k + 1) * D]
    return out


def naive_hivit(net: HiViT, x, ids_keep=None):
    """HiViT forward the long way: conv patch embed on every unit, gather afterwards,
    slice-and-cat merges, naive attention."""
    B, _, H, W = x.shape
    grid = (H // 16, W // 16)
    t = naive_patch_embed(net.patch_embed, x, ids_keep)
    m1, m2 = net.mlp_depths
    blocks = list(net.blocks)
    for blk in blocks[:m1]:
        t = blk(t)
    f4 = t
    t = naive_patch_merge(blocks[m1], t)
    for blk in blocks[m1 + 1 : m1 + 1 + m2]:
        t = blk(t)
    f8 = t
    t = naive_patch_merge(blocks[m1 + 1 + m2], t)[..., 0, 0, :]
    pos = net.pos_embed_for(grid).expand(B, -1, -1)
    if ids_keep is not None:
        pos = torch.stack([pos[b, ids_keep[b]] for b in range(B)])
    t = t + pos
    for blk in blocks[m1 + m2 + 2 :]:
        t = t + naive_attention(blk.attn, blk.norm1(t))
        t = t + blk.mlp(blk.norm2(t))
    return f4, f8, t


def _close(a, b, dtype=torch.float32):
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_matches_softmax_qkv(with_bias):
    torch.manual_seed(0)
    attn = Attention(dim=48, num_heads=3)
    x = torch.randn(2, 10, 48)
    bias = torch.randn(1, 3, 10, 10) if with_bias else None
    _close(attn(x, bias), naive_attention(attn, x, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attn(x, bias)
    assert fast.dtype == torch.bfloat16
    _close(fast, naive_attention(attn, x, bias), torch.bfloat16)


def test_patch_embed_matches_conv_then_units():
    torch.manual_seed(0)
    pe = PatchEmbed(in_chans=3, embed_dim=8)
    x = torch.randn(2, 3, 48, 64)  # 3x4 units
    _close(pe(x), naive_patch_embed(pe, x))
    ids_keep = torch.tensor([[0, 5, 11], [2, 3, 7]])
    _close(pe(x, ids_keep), naive_patch_embed(pe, x, ids_keep))
    # the gradient reaches the Conv2d weight (same parameter, same name)
    pe(x, ids_keep).sum().backward()
    assert pe.proj.weight.grad is not None and pe.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("hw", [(4, 4), (2, 2)])
def test_patch_merge_matches_index_lists(hw):
    torch.manual_seed(0)
    pm = PatchMerge(dim=6)
    x = torch.randn(2, 5, *hw, 6)
    _close(pm(x), naive_patch_merge(pm, x))
    # the slice-and-cat form of the release
    ref = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
    _close(pm(x), pm.reduction(pm.norm(ref)))


def test_patch_split_matches_loops():
    torch.manual_seed(0)
    ps = PatchSplit(dim=12, out_dim=5)
    x = torch.randn(2, 3, 2, 2, 12)
    _close(ps(x), naive_patch_split(ps, x))


def test_unit_layout_conversions_pixel_by_pixel():
    torch.manual_seed(0)
    B, h, w, s, C = 2, 3, 2, 4, 5
    units = torch.randn(B, h * w, s, s, C)
    m = units_to_map(units, (h, w))
    naive = torch.empty(B, C, h * s, w * s)
    for n in range(h * w):
        r, c = divmod(n, w)
        for a in range(s):
            for b in range(s):
                naive[:, :, r * s + a, c * s + b] = units[:, n, a, b]
    torch.testing.assert_close(m, naive, rtol=0, atol=0)
    torch.testing.assert_close(map_to_units(m, s), units, rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_hivit_matches_naive_forward(masked):
    torch.manual_seed(0)
    net = HiViT(**hivit_arch("tiny"), pretrain_img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    ids_keep = torch.tensor([[1, 4, 9, 15], [0, 2, 3, 8]]) if masked else None
    with torch.no_grad():
        fast = net(x, ids_keep)
        slow = naive_hivit(net, x, ids_keep)
    for a, b in zip(fast, slow):
        _close(a, b)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast16 = net(x, ids_keep)
    for a, b in zip(fast16, slow):
        _close(a, b, torch.bfloat16)


def test_hivit_gradients_match_naive():
    torch.manual_seed(0)
    net = HiViT(**hivit_arch("tiny"), pretrain_img_size=64)
    x = torch.randn(2, 3, 64, 64)
    ids_keep = torch.tensor([[1, 4, 9, 15], [0, 2, 3, 8]])
    grads = []
    for fn in (lambda: net(x, ids_keep), lambda: naive_hivit(net, x, ids_keep)):
        net.zero_grad()
        sum(t.square().mean() for t in fn()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-3, msg=n)


def test_pixel_decoder_matches_per_level_scatter():
    """The decoder sums the level embeddings before one scatter; the release scatters each
    level with the mask token and sums."""
    torch.manual_seed(0)
    dec = PixelDecoder(in_dim=16, dec_dim=32, depth=1, num_heads=2, pretrain_img_size=64).eval()
    B, nv, grid = 2, 5, (4, 4)
    feats = (torch.randn(B, nv, 4, 4, 16), torch.randn(B, nv, 2, 2, 16), torch.randn(B, nv, 1, 1, 16))
    ids_keep = torch.stack([torch.randperm(16)[:nv].sort().values for _ in range(B)])
    n = grid[0] * grid[1]
    x = 0
    for emb, f in zip(dec.decoder_embed, feats[::-1]):
        y = emb(f).reshape(B, nv, -1)
        full = dec.mask_token.expand(B, n, -1).clone()
        for b in range(B):
            full[b, ids_keep[b]] = y[b]
        x = x + full
    x = x + dec.decoder_pos_embed
    for blk in dec.decoder_blocks:
        x = x + naive_attention(blk.attn, blk.norm1(x))
        x = x + blk.mlp(blk.norm2(x))
    ref = dec.decoder_pred(dec.decoder_norm(x))
    with torch.no_grad():
        _close(dec(feats, ids_keep, grid), ref)


def test_feature_pyramid_unchanged_by_layout():
    """Pyramid output in unit layout equals the naive PatchSplit path."""
    torch.manual_seed(0)
    pyr = FeaturePyramid(embed_dim=32, out_dim=8, depth=1).eval()
    f4, f8, f16 = torch.randn(2, 3, 4, 4, 8), torch.randn(2, 3, 2, 2, 16), torch.randn(2, 3, 32)
    with torch.no_grad():
        p4, p8, p16 = pyr(f4, f8, f16)
        x8 = pyr.block_16to8(naive_patch_split(pyr.split_16to8, f16[:, :, None, None]) + pyr.align_dim_16to8(f8))
        x4 = pyr.block_8to4(naive_patch_split(pyr.split_8to4, x8) + pyr.align_dim_8to4(f4))
    _close(p8, pyr.fpn_modules[1](x8))
    _close(p4, pyr.fpn_modules[2](x4))


@pytest.mark.slow
def test_benchmark_tool_quick_tiny():
    """tools/benchmark.py --quick on a tiny model prints throughput, FLOP rate and matmul lines."""
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--quick", "--what", "pretrain,det",
        "--arch", "tiny", "--img", "64", "--batch", "2", "--dtypes", "fp32,bf16", "--reference", "off",
        "--det-config", "configs/COCO/mask_rcnn_itpn_tiny_demo.py", "--det-sizes", "128x128",
        "--warmup", "0", "--reps", "1",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "machine:" in out
    dtypes = ["fp32"]
    if cpu_has_native_bf16():
        dtypes.append("bf16")
    else:  # emulated bf16 is skipped with a message saying why
        assert "[pretrain] bf16: SKIPPED: this CPU has no native bf16" in out, out
        assert "[det] bf16: SKIPPED" in out, out
    for d in dtypes:
        assert f"[pretrain] matmul 2048x2048 {d}:" in out, out
        assert f"[pretrain] ours {d}:" in out and "img/s" in out, out
        assert f"% of the {d} matmul rate" in out, out
        assert f"[det] train 128x128 {d}" in out, out
        assert f"[det] inference 128x128 {d}" in out, out
    assert "GFLOP/img fwd+bwd" in out
    assert "peak memory" in out
    assert "reference: not run" in out
