"""Layer-wise LR decay for HiViT: pinned factors, and the max factor of a real Mask R-CNN is 1."""
import math
from functools import partial

import pytest
import torch

from itpn_d2.lr_decay import get_hivit_lr_decay_rate, hivit_lr_factor_func, hivit_num_layers


def test_num_layers_counts_every_block_kind():
    assert hivit_num_layers((1, 1), 6) == 10  # tiny: 1 MLP, merge, 1 MLP, merge, 6 attention
    assert hivit_num_layers((3, 3), 24) == 32  # official base
    assert hivit_num_layers((2, 2), 40) == 46  # official large
    assert hivit_num_layers((4, 4), 24) == 34  # mmpretrain base


def test_pinned_factors_tiny():
    # tiny layout: blocks 0 MLP, 1 merge, 2 MLP, 3 merge, 4..9 attention -> L = 10.
    f = partial(get_hivit_lr_decay_rate, lr_decay_rate=0.5, num_layers=10)
    expected = {
        "backbone.net.patch_embed.proj.weight": 0.5**11,
        "backbone.net.patch_embed.norm.bias": 0.5**11,
        "backbone.net.absolute_pos_embed": 0.5**11,
        "backbone.net.blocks.0.mlp.fc1.weight": 0.5**10,  # first MLP block
        "backbone.net.blocks.1.reduction.weight": 0.5**9,  # first PatchMerge counts as a layer
        "backbone.net.blocks.3.norm.weight": 0.5**7,  # second PatchMerge
        "backbone.net.blocks.4.attn.qkv.weight": 0.5**6,  # first attention block
        "backbone.net.blocks.9.mlp.fc2.bias": 0.5,  # last encoder block: exactly rate ** 1
        "backbone.pyramid.block_16to8.0.mlp.fc1.weight": 1.0,
        "backbone.pyramid.fpn_modules.2.norm2.weight": 1.0,
        "roi_heads.box_predictor.cls_score.weight": 1.0,
        "proposal_generator.rpn_head.conv.conv0.weight": 1.0,
        "decoder_blocks.0.attn.qkv.weight": 1.0,  # pre-training decoder beside the backbone
        "mask_token": 1.0,
    }
    for name, want in expected.items():
        assert math.isclose(f(name), want, rel_tol=1e-12), (name, f(name), want)


def test_reference_off_by_one_not_copied():
    # The reference gives its last block rate ** -1; we never exceed 1, even for rate 0.1.
    f = partial(get_hivit_lr_decay_rate, lr_decay_rate=0.1, num_layers=32)
    factors = [f(f"backbone.net.blocks.{i}.mlp.fc1.weight") for i in range(32)]
    assert max(factors) == pytest.approx(0.1)
    assert all(a < b for a, b in zip(factors, factors[1:]))  # strictly increasing with depth


def test_block_beyond_num_layers_is_an_error():
    with pytest.raises(ValueError, match="num_layers"):
        get_hivit_lr_decay_rate("backbone.net.blocks.10.mlp.fc1.weight", 0.9, num_layers=10)
    with pytest.raises(ValueError, match="lr_decay_rate"):
        get_hivit_lr_decay_rate("backbone.net.blocks.0.mlp.fc1.weight", 1.5, num_layers=10)


def test_max_factor_is_one_on_real_mask_rcnn():
    from detectron2.config import LazyConfig, instantiate

    from itpn_d2.modeling import hivit_arch

    cfg = LazyConfig.load("configs/common/models/mask_rcnn_itpn.py")
    cfg.model.backbone.net.update(hivit_arch("tiny"))
    cfg.model.backbone.net.use_act_checkpoint = False
    model = instantiate(cfg.model)
    net = model.backbone.net
    func = hivit_lr_factor_func(lr_decay_rate=0.9, mlp_depths=net.mlp_depths, depth=net.depth, rule="itpn_d2")
    names = [n for n, _ in model.named_parameters()]
    factors = {n: func(n) for n in names}
    assert max(factors.values()) == 1.0
    L = len(net.blocks)
    last = f"backbone.net.blocks.{L - 1}."
    assert all(math.isclose(v, 0.9) for n, v in factors.items() if n.startswith(last))
    assert all(v == 1.0 for n, v in factors.items() if not n.startswith("backbone.net."))
    assert math.isclose(factors["backbone.net.patch_embed.proj.weight"], 0.9 ** (L + 1))
    # Every encoder parameter decays.
    assert all(v < 1.0 for n, v in factors.items() if n.startswith("backbone.net."))
