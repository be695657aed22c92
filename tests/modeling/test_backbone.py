"""The foundation: HiViT + FeaturePyramid as a detectron2 backbone."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from tests.helpers.models import make_tiny_backbone, mask_rcnn_sample, tiny_mask_rcnn
from itpn_d2.modeling import HIVIT_ARCHS, HiViT, ITPNBackbone, ITPNSegBackbone, hivit_arch


@pytest.mark.parametrize("hw", [(224, 224), (320, 480), (800, 1216)])
def test_output_shapes_and_strides(tiny_backbone, hw):
    H, W = hw
    with torch.no_grad():
        out = tiny_backbone(torch.randn(1, 3, H, W))
    shapes = tiny_backbone.output_shape()
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for name, t in out.items():
        s = shapes[name].stride
        assert s == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}[name]
        assert t.shape == (1, shapes[name].channels, H // s, W // s), (name, t.shape)
        assert torch.isfinite(t).all()


def test_size_divisibility_and_padding_constraints(tiny_backbone):
    assert tiny_backbone.size_divisibility == 64
    pc = tiny_backbone.padding_constraints
    assert pc == {"size_divisibility": 64, "square_size": 0}
    images = ImageList.from_tensors(
        [torch.zeros(3, 100, 150), torch.zeros(3, 90, 70)],
        tiny_backbone.size_divisibility,
        padding_constraints=pc,
    )
    assert images.tensor.shape[-2:] == (128, 192)


def test_rejects_input_not_multiple_of_16(tiny_backbone):
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_backbone.net(torch.randn(1, 3, 72, 64))


def _visible(x, ids_keep):
    idx = ids_keep.view(*ids_keep.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


@pytest.mark.parametrize("rel_pos", [False, True])
def test_masked_forward_equals_dense_when_nothing_masked(rel_pos):
    torch.manual_seed(0)
    bb = make_tiny_backbone(rel_pos=rel_pos, layer_scale_init=0.1 if rel_pos else None).eval()
    x = torch.randn(2, 3, 96, 128)
    n = (96 // 16) * (128 // 16)
    ids_all = torch.arange(n).expand(2, -1)
    with torch.no_grad():
        dense = bb.net(x) + bb.pyramid(*bb.net(x))
        masked = sum(bb.forward_units(x, ids_all), ())  # encoder + pyramid
    for a, b in zip(dense, masked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_masked_units_stages_1_2_match_dense_restricted():
    """Before attention, a kept unit's features do not depend on which others are kept."""
    torch.manual_seed(0)
    bb = make_tiny_backbone().eval()
    x = torch.randn(2, 3, 64, 64)
    ids_keep = torch.stack([torch.randperm(16)[:4].sort().values for _ in range(2)])
    with torch.no_grad():
        f4, f8, _ = bb.net(x)
        g4, g8, g16 = bb.net(x, ids_keep)
    assert g16.shape == (2, 4, bb.net.embed_dim)
    torch.testing.assert_close(g4, _visible(f4, ids_keep), rtol=0, atol=1e-6)
    torch.testing.assert_close(g8, _visible(f8, ids_keep), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rel_pos", [False, True])
def test_masked_units_cannot_leak(rel_pos):
    torch.manual_seed(0)
    bb = make_tiny_backbone(rel_pos=rel_pos).eval()
    x = torch.randn(2, 3, 64, 96)
    grid_w = 96 // 16
    n = (64 // 16) * grid_w
    keep = torch.stack([torch.randperm(n)[: n // 4].sort().values for _ in range(2)])
    masked = torch.ones(2, n, dtype=torch.bool)
    masked.scatter_(1, keep, False)

    def paint(img, sample, unit):
        r, c = divmod(unit, grid_w)
        img[sample, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = torch.randn(3, 16, 16) * 5

    x2 = x.clone()
    for b in range(2):
        for u in torch.nonzero(masked[b]).flatten().tolist():
            paint(x2, b, u)
    with torch.no_grad():
        ref = sum(bb.forward_units(x, keep), ())
        out = sum(bb.forward_units(x2, keep), ())
    for a, b in zip(ref, out):
        assert torch.equal(a, b)

    # Control: changing one visible unit does change visible features.
    x3 = x.clone()
    paint(x3, 0, keep[0, 0].item())
    with torch.no_grad():
        out3 = bb.forward_units(x3, keep).pyramid
    assert not torch.equal(out3[2], ref[5])


def test_position_embedding_interpolates_for_any_grid(tiny_backbone):
    net = tiny_backbone.net
    assert net.absolute_pos_embed.shape == (1, 196, net.embed_dim)
    pe = net.pos_embed_for((14, 14))
    assert pe is net.absolute_pos_embed
    pe2 = net.pos_embed_for((20, 30))
    assert pe2.shape == (1, 600, net.embed_dim)


def test_block_layout_and_official_key_names():
    with torch.device("meta"):
        net = HiViT(**hivit_arch("base", "official"))
    keys = set(net.state_dict())
    assert "blocks.3.reduction.weight" in keys and "blocks.7.reduction.weight" in keys
    assert "blocks.0.mlp.fc1.weight" in keys and "blocks.8.attn.qkv.weight" in keys
    assert "blocks.31.mlp.fc2.bias" in keys and "blocks.32.norm1.weight" not in keys
    assert net.num_layers == 32


def _count(size, layout):
    with torch.device("meta"):
        net = HiViT(**hivit_arch(size, layout))
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    "size,layout,millions",
    [("base", "official", 77.90), ("large", "official", 287.37), ("base", "mmpretrain", 78.40), ("large", "mmpretrain", 289.59)],
)
def test_encoder_parameter_counts(size, layout, millions):
    assert round(_count(size, layout) / 1e6, 2) == pytest.approx(millions, abs=0.01)


def test_arch_table_lookup_error_names_choices():
    with pytest.raises(KeyError, match="sizes"):
        hivit_arch("huge")
    assert ("tiny", "official") in HIVIT_ARCHS


def test_registered_backbone_builds_from_yacs_cfg():
    assert "ITPNBackbone" in BACKBONE_REGISTRY
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "ITPNBackbone"
    cfg.MODEL.ITPN = type(cfg)()
    cfg.MODEL.ITPN.SIZE = "tiny"
    cfg.MODEL.ITPN.FPN_DIM = 32
    bb = build_backbone(cfg, ShapeSpec(channels=3))
    assert bb.output_shape()["p2"].channels == 32
    assert bb.net.embed_dim == hivit_arch("tiny")["embed_dim"]


def test_mask_rcnn_from_lazyconfig_trains_and_infers_on_cpu(repo_root):
    torch.manual_seed(0)
    model = tiny_mask_rcnn(repo_root)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with EventStorage(0):
        losses = model([mask_rcnn_sample(128, 160), mask_rcnn_sample(112, 128)])
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("backbone.pyramid.")]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    opt.step()

    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 120, 150)).float(), "height": 240, "width": 300}])
    inst = out[0]["instances"]
    assert inst.image_size == (240, 300)
    assert inst.has("pred_masks") and inst.has("pred_boxes")


def test_layer_scale_on_stem_mlp_blocks_as_in_official_clip_checkpoints():
    """The official CLIP variant (init_values) gives every stem MLP block a gamma_2 and every
    attention block gamma_1/gamma_2; PatchMerge and the pyramid have none."""
    net = HiViT(**hivit_arch("tiny"), layer_scale_init=0.1)
    keys = set(net.state_dict())
    m1, m2 = net.mlp_depths
    stem = list(range(m1)) + list(range(m1 + 1, m1 + 1 + m2))
    assert all(f"blocks.{i}.gamma_2" in keys and f"blocks.{i}.gamma_1" not in keys for i in stem)
    assert f"blocks.{m1}.gamma_2" not in keys and f"blocks.{m1 + 1 + m2}.gamma_2" not in keys
    assert "blocks.%d.gamma_1" % (m1 + m2 + 2) in keys
    plain = set(HiViT(**hivit_arch("tiny")).state_dict())
    assert not any("gamma" in k for k in plain)
    # gamma_2 scales the MLP branch: zero gamma makes a stem block the identity
    blk = net.blocks[0]
    with torch.no_grad():
        blk.gamma_2.zero_()
        x = torch.randn(2, 3, 4, 4, blk.norm2.normalized_shape[0])
        assert torch.equal(blk(x), x)


def test_frozen_backbone_is_a_fixed_feature_extractor(caplog):
    """``ITPNBackbone(frozen=True)`` (the detection backbone's constructor path): no parameter
    trains, eval mode survives ``train()``, freezing is one-way, and a training run says so in
    its log, warning when no checkpoint gave the frozen weights."""
    import logging

    from itpn_d2.engine.lazyconfig_run import log_frozen_backbone

    torch.manual_seed(0)
    b = make_tiny_backbone(drop_path_rate=0.5)
    frozen = ITPNBackbone(net=b.net, pyramid=b.pyramid, frozen=True)
    assert frozen.frozen and not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training and not any(m.training for m in frozen.modules())
    with pytest.raises(AttributeError):
        frozen.frozen = False
    x = torch.randn(1, 3, 64, 64)
    first, second = frozen(x), frozen(x)  # no drop path: the same maps twice
    for k in first:
        assert torch.equal(first[k], second[k]) and not first[k].requires_grad, k

    model = torch.nn.Module()
    model.backbone = frozen
    with caplog.at_level(logging.INFO, logger="itpn_d2"):
        log_frozen_backbone(model, loaded=True)
        assert "The backbone is frozen" in caplog.text and "randomly initialised" not in caplog.text
        log_frozen_backbone(model, loaded=False)
        assert "randomly initialised" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="itpn_d2"):
        model.backbone = make_tiny_backbone()
        log_frozen_backbone(model, loaded=False)
    assert "frozen" not in caplog.text


def test_a_backbone_without_p2_skips_the_pyramids_stride_4_level():
    """Out features from p3 down: the pyramid's stride-4 path (``split_8to4``, ``block_8to4``,
    ``fpn_modules[2]``) does not run, and every map returned is the one the full backbone gives."""
    torch.manual_seed(0)
    b = make_tiny_backbone().eval()
    full = ITPNSegBackbone(net=b.net, pyramid=b.pyramid).eval()
    from_p3 = ITPNSegBackbone(net=b.net, pyramid=b.pyramid, out_features=["p3", "p4", "p5", "c3", "c4", "c5"]).eval()
    calls = []
    for name in ("split_8to4", "block_8to4"):
        getattr(b.pyramid, name).register_forward_hook(lambda *a, name=name: calls.append(name))
    b.pyramid.fpn_modules[2].register_forward_hook(lambda *a: calls.append("fpn_modules.2"))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        reference = full(x)
        assert calls == ["split_8to4", "block_8to4", "fpn_modules.2"]
        calls.clear()
        out = from_p3(x)
    assert calls == []
    assert list(out) == ["p3", "p4", "p5", "c3", "c4", "c5"]
    for name, t in out.items():
        assert torch.equal(t, reference[name]), name
    # the unit-layout entry point says the same: p2 skipped, p3 and p4 unchanged
    with torch.no_grad():
        units = b.forward_units(x, with_p2=False)
        assert units.pyramid[0] is None
        for skipped, whole in zip(units.pyramid[1:], b.forward_units(x).pyramid[1:]):
            assert torch.equal(skipped, whole)
