"""UPerNet semantic segmentation with the iTPN backbone, built from the real config
(configs/common/models/uper_itpn.py) with the encoder patched to the tiny size."""

import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec

from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone, hivit_arch
from itpn_d2.modeling.seg_backbone import ITPNSegBackbone, itpn_seg_output_shape
from itpn_d2.modeling.slide_segmentor import SlidingWindowSemanticSegmentor
from itpn_d2.modeling.uper_head import UPerHead
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
NUM_CLASSES = 5


def tiny_uper_cfg(**head):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/common/models/uper_itpn.py"))
    cfg.model.backbone.net.update(hivit_arch("tiny"))
    cfg.model.backbone.pyramid.out_dim = 32
    cfg.model.sem_seg_head.channels = 32
    cfg.model.sem_seg_head.aux_channels = 16
    cfg.model.sem_seg_head.num_classes = NUM_CLASSES
    cfg.model.sem_seg_head.update(head)
    return cfg


def build_tiny(drop_path_rate=0.1, **head):
    torch.manual_seed(0)
    cfg = tiny_uper_cfg(**head)
    cfg.model.backbone.net.drop_path_rate = drop_path_rate
    return instantiate(cfg.model)


def _inputs(hw=(96, 128), n=2, with_target=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = {"image": torch.randint(0, 256, (3, *hw), generator=g).float(), "height": hw[0], "width": hw[1]}
        if with_target:
            t = torch.randint(0, NUM_CLASSES, hw, generator=g)
            t[:8] = 255  # void rows are ignored by the loss
            d["sem_seg"] = t
        out.append(d)
    return out


def test_config_channels_follow_reference_for_base():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/common/models/uper_itpn.py"))
    shapes = instantiate(cfg.model.sem_seg_head.input_shape)
    levels = cfg.model.sem_seg_head.in_features
    # The release's UPerNet-B (sunsmarterjie/iTPN seg/configs/itpn/*.py, decode_head in_channels):
    # levels are concat(pyramid, encoder) = 384, 512, 768, 768 channels.
    assert [sum(shapes[n].channels for n in g) for g in levels] == [384, 512, 768, 768]
    assert [shapes[g[0]].stride for g in levels] == [4, 8, 16, 32]


def test_output_shape_helper_matches_backbone():
    model = build_tiny()
    assert isinstance(model.backbone, ITPNBackbone)
    expected = itpn_seg_output_shape(embed_dim=192, out_dim=32)
    assert model.backbone.output_shape() == expected
    x = torch.randn(1, 3, 64, 96)
    feats = model.backbone(x)
    for name, spec in expected.items():
        assert feats[name].shape == (1, spec.channels, 64 // spec.stride, 96 // spec.stride), name


def test_backbone_keys_are_the_plain_itpn_backbone_keys():
    """The one rule: the segmentation model's backbone has exactly the keys (and shapes) of
    ITPNBackbone, so a pre-training checkpoint loads strictly, tensor for tensor."""
    model = build_tiny()
    torch.manual_seed(1)
    net = HiViT(**hivit_arch("tiny"))
    plain = ITPNBackbone(net=net, pyramid=FeaturePyramid(embed_dim=192, out_dim=32, depth=2))
    src = plain.state_dict()
    assert set(model.backbone.state_dict()) == set(src)
    model.backbone.load_state_dict(src, strict=True)
    full = model.state_dict()
    for k, v in src.items():
        assert torch.equal(full["backbone." + k], v), k


def test_training_step_losses_and_gradients():
    model = build_tiny()
    model.train()
    losses = model(_inputs())
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    for k, v in losses.items():
        assert torch.isfinite(v), k
    # With random weights the main loss is near log(K); aux is weighted 0.4.
    assert abs(losses["loss_sem_seg"].item() - np.log(NUM_CLASSES)) < 1.0
    assert abs(losses["loss_sem_seg_aux"].item() - 0.4 * np.log(NUM_CLASSES)) < 0.5
    sum(losses.values()).backward()
    for name in [
        "backbone.pyramid.fpn_modules.2.mlp.fc1.weight",  # stride-4 pyramid level
        "backbone.pyramid.align_dim_16tofpn.weight",
        "backbone.net.patch_embed.proj.weight",
        "backbone.net.blocks.0.mlp.fc1.weight",  # reaches the head through c2 as well
        "sem_seg_head.ppm.convs.3.weight",
        "sem_seg_head.aux_conv.weight",
    ]:
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ignore_value_is_ignored():
    model = build_tiny(drop_path_rate=0.0, dropout=0.0)
    model.train()
    inputs = _inputs(n=2)
    base = model(inputs)["loss_sem_seg"].item()
    for d in inputs:
        d["sem_seg"][:8] = 0  # now the former void rows count
    changed = model(inputs)["loss_sem_seg"].item()
    assert base != pytest.approx(changed, abs=1e-6)
    for d in inputs:
        d["sem_seg"][:] = 255
    losses = model(inputs)  # an all-void crop: zero loss (not NaN), and still differentiable
    assert losses["loss_sem_seg"].item() == 0.0 and losses["loss_sem_seg_aux"].item() == 0.0
    assert losses["loss_sem_seg"].requires_grad


def test_class_weights_give_the_weighted_mean_cross_entropy():
    shapes = {"p2": ShapeSpec(channels=8, stride=4)}
    weights = [0.5, 2.0, 4.0]
    head = UPerHead(input_shape=shapes, num_classes=3, channels=8, norm=None, dropout=0.0, class_weight=weights)
    plain = UPerHead(input_shape=shapes, num_classes=3, channels=8, norm=None, dropout=0.0)
    plain.load_state_dict(head.state_dict())  # same weights; class_weight is not a checkpoint tensor
    torch.manual_seed(0)
    feats = {"p2": torch.randn(2, 8, 6, 6)}
    targets = torch.randint(0, 3, (2, 24, 24))
    targets[0, :4] = 255
    logits = torch.nn.functional.interpolate(head.layers(feats), size=(24, 24), mode="bilinear", align_corners=False)
    want = torch.nn.functional.cross_entropy(logits, targets, weight=torch.tensor(weights), ignore_index=255)
    got = head(feats, targets)[1]["loss_sem_seg"]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() != pytest.approx(plain(feats, targets)[1]["loss_sem_seg"].item(), rel=1e-3)
    void = torch.full_like(targets, 255)  # an all-void crop: 0, not NaN, weighted too
    assert head(feats, void)[1]["loss_sem_seg"].item() == 0.0
    head.to(torch.bfloat16)  # a model cast whole to bf16: the weights follow, the loss stays fp32
    bf16_loss = head({"p2": feats["p2"].bfloat16()}, targets)[1]["loss_sem_seg"]
    assert bf16_loss.dtype == torch.float32 and bf16_loss.item() == pytest.approx(want.item(), rel=0.05)
    with pytest.raises(ValueError, match="class_weight has 2 values"):
        UPerHead(input_shape=shapes, num_classes=3, class_weight=[1.0, 2.0])


@pytest.mark.parametrize("hw", [(96, 128), (100, 120)])
def test_inference_returns_logits_at_input_size(hw):
    model = build_tiny().eval()
    with torch.no_grad():
        out = model(_inputs(hw, n=2, with_target=False))
    assert len(out) == 2
    for o in out:
        assert o["sem_seg"].shape == (NUM_CLASSES, *hw)
        assert torch.isfinite(o["sem_seg"]).all()
    # "height"/"width" ask for another output resolution.
    inp = _inputs(hw, n=1, with_target=False)
    inp[0]["height"], inp[0]["width"] = 50, 70
    with torch.no_grad():
        assert model(inp)[0]["sem_seg"].shape == (NUM_CLASSES, 50, 70)


@pytest.mark.parametrize("hw", [(96, 128), (100, 120)])
def test_a_stride_8_head_predicts_at_input_size_and_trains(hw):
    """A head whose finest level is p3 (``make demo``'s frozen segmentation stage before it read p2): its logits are
    at 1/8 of the (padded) input, upsampled 8x, then cut to the input size; the loss trains it."""
    model = build_tiny(in_features=[("p3", "c3"), ("p4", "c4"), ("p5", "c5")])
    assert model.sem_seg_head.common_stride == 8
    model.eval()
    with torch.no_grad():
        out = model(_inputs(hw, n=2, with_target=False))
    for o in out:
        assert o["sem_seg"].shape == (NUM_CLASSES, *hw)
        assert torch.isfinite(o["sem_seg"]).all()
    model.train()
    losses = model(_inputs(hw, n=2))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    lateral = list(model.sem_seg_head.lateral_convs.parameters())
    assert lateral and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lateral)


def test_a_level_takes_its_finer_features_space_to_depth():
    """A level ("p2", "p3") is at stride 8: each 2x2 block of p2 becomes one position of 4x its
    channels (nothing averaged away), concatenated before p3. The same logits as a head given that
    rearranged map as a stride-8 feature, with the same weights."""
    torch.manual_seed(0)
    shapes = {"p2": ShapeSpec(channels=6, stride=4), "p3": ShapeSpec(channels=8, stride=8),
              "p4": ShapeSpec(channels=8, stride=16)}
    head = UPerHead(input_shape=shapes, num_classes=3, channels=32, norm="GN", in_features=[("p2", "p3"), "p4"],
                    aux_in_feature=("p2", "p3"), aux_channels=32).eval()
    assert head.common_stride == 8
    assert head.lateral_convs[0].in_channels == 4 * 6 + 8 and head.aux_conv.in_channels == 4 * 6 + 8
    blocks_shapes = {**shapes, "p2_blocks": ShapeSpec(channels=24, stride=8)}
    ref = UPerHead(input_shape=blocks_shapes, num_classes=3, channels=32, norm="GN",
                   in_features=[("p2_blocks", "p3"), "p4"], aux_in_feature=("p2_blocks", "p3"), aux_channels=32).eval()
    ref.load_state_dict(head.state_dict())
    g = torch.Generator().manual_seed(1)
    feats = {n: torch.randn(2, s.channels, 64 // s.stride, 96 // s.stride, generator=g) for n, s in shapes.items()}
    # (B, C, 2h, 2w) -> (B, C*4, h, w), channel c*4 + 2*i + j holding the block's pixel (i, j)
    blocks = feats["p2"].reshape(2, 6, 8, 2, 12, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 24, 8, 12)
    with torch.no_grad():
        logits = head.layers(feats)
        assert logits.shape == (2, 3, 8, 12)
        assert torch.allclose(logits, ref.layers({**feats, "p2_blocks": blocks}), atol=1e-6)
        # the auxiliary level is gathered the same way
        assert torch.equal(head._gather(feats, head.aux_in_feature), torch.cat([blocks, feats["p3"]], dim=1))
        # (the comparison can tell: the block's pixels in another channel order give other logits)
        shuffled = blocks.reshape(2, 6, 4, 8, 12).flip(2).reshape(2, 24, 8, 12)
        assert not torch.allclose(logits, ref.layers({**feats, "p2_blocks": shuffled}), atol=1e-6)


def test_logit_upscale_gives_each_position_a_block_of_logits():
    """logit_upscale=2: the classifier's 4K channels at stride 8 are K logits at stride 4, channel
    k*4 + 2*i + j going to pixel (i, j) of the position's 2x2 block (depth-to-space)."""
    torch.manual_seed(0)
    shapes = {"p3": ShapeSpec(channels=8, stride=8), "p4": ShapeSpec(channels=8, stride=16)}
    head = UPerHead(input_shape=shapes, num_classes=3, channels=32, norm="GN", logit_upscale=2).eval()
    assert head.common_stride == 4 and head.predictor.out_channels == 12
    g = torch.Generator().manual_seed(1)
    feats = {n: torch.randn(2, s.channels, 64 // s.stride, 96 // s.stride, generator=g) for n, s in shapes.items()}
    seen = []
    hook = head.predictor.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        logits = head.layers(feats)
        full, _ = head(feats)
    hook.remove()
    per_position = seen[0]  # (2, 12, 8, 12)
    blocks = per_position.reshape(2, 3, 2, 2, 8, 12).permute(0, 1, 4, 2, 5, 3).reshape(2, 3, 16, 24)
    assert logits.shape == (2, 3, 16, 24) and torch.equal(logits, blocks)
    assert full.shape == (2, 3, 64, 96)  # upsampled 4x, not 8x, to the input
    # trains: the loss reaches every block channel of the classifier
    head.train()
    _, losses = head(feats, torch.randint(0, 3, (2, 64, 96), generator=g))
    losses["loss_sem_seg"].backward()
    assert (head.predictor.weight.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    for bad in (3, 0, 2.0):  # not a divisor of stride 8, not positive, not an int
        with pytest.raises(ValueError, match=f"logit_upscale={bad}"):
            UPerHead(input_shape=shapes, num_classes=3, channels=32, logit_upscale=bad)


def test_sliding_window_inference():
    cfg = tiny_uper_cfg()
    cfg.model._target_ = SlidingWindowSemanticSegmentor
    torch.manual_seed(0)
    cfg.model.crop_size, cfg.model.stride = (256, 256), (170, 170)
    whole = instantiate(cfg.model).eval()
    plain = build_tiny().eval()
    plain.load_state_dict(whole.state_dict())
    inp = _inputs((96, 128), n=1, with_target=False)
    with torch.no_grad():
        ref = plain(inp)[0]["sem_seg"]
        # A window larger than the image is whole-image inference.
        assert torch.allclose(whole(inp)[0]["sem_seg"], ref, atol=1e-5)
        whole.crop_size, whole.stride = (64, 64), (43, 43)
        slid = whole(inp)[0]["sem_seg"]
    assert slid.shape == ref.shape and torch.isfinite(slid).all()
    assert not torch.allclose(slid, ref, atol=1e-3)  # windows see less context: different logits


def test_head_rejects_bad_features():
    shapes = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}
    with pytest.raises(KeyError, match="p9"):
        UPerHead(input_shape=shapes, num_classes=3, in_features=["p2", "p9"])
    with pytest.raises(ValueError, match="cannot be brought"):
        UPerHead(input_shape={**shapes, "q": ShapeSpec(channels=8, stride=12)}, num_classes=3, in_features=[("p3", "q")])
    with pytest.raises(ValueError, match="fine to coarse"):
        UPerHead(input_shape=shapes, num_classes=3, in_features=["p3", "p2"])
    with pytest.raises(ValueError, match="unknown"):
        ITPNSegBackbone(
            net=HiViT(**hivit_arch("tiny")), pyramid=FeaturePyramid(embed_dim=192, out_dim=8), out_features=["p6"]
        )


@pytest.mark.parametrize("norm", ["BN", "GN", "LN", None])
def test_head_norms_run_on_cpu(norm):
    shapes = {"p2": ShapeSpec(channels=32, stride=4), "p3": ShapeSpec(channels=32, stride=8)}
    head = UPerHead(input_shape=shapes, num_classes=3, channels=32, norm=norm, aux_in_feature="p3")
    feats = {"p2": torch.randn(2, 32, 16, 16), "p3": torch.randn(2, 32, 8, 8)}
    head.train()
    _, losses = head(feats, torch.randint(0, 3, (2, 64, 64)))
    assert all(torch.isfinite(v) for v in losses.values())
    head.eval()
    logits, extra = head(feats)
    assert logits.shape == (2, 3, 64, 64) and extra == {}


def test_ade20k_train_mapper_from_config(tmp_path):
    """The ADE20K augmentation chain of configs/common/data/ade20k.py on a generated record."""
    import cv2

    cfg = LazyConfig.load(os.path.join(ROOT, "configs/common/data/ade20k.py"))
    mapper = instantiate(cfg.dataloader.train.mapper)
    img = np.random.RandomState(0).randint(0, 255, (120, 160, 3), dtype=np.uint8)
    lab = np.zeros((120, 160), np.uint8)
    lab[:, 80:] = 3
    lab[:10] = 255
    cv2.imwrite(str(tmp_path / "a.jpg"), img)
    cv2.imwrite(str(tmp_path / "a.png"), lab)
    d = mapper(
        {
            "file_name": str(tmp_path / "a.jpg"),
            "sem_seg_file_name": str(tmp_path / "a.png"),
            "height": 120,
            "width": 160,
        }
    )
    assert d["image"].shape[0] == 3 and d["image"].shape[1:] == d["sem_seg"].shape
    assert max(d["sem_seg"].shape) <= 512
    assert set(d["sem_seg"].unique().tolist()) <= {0, 3, 255}


def test_built_from_a_pretraining_checkpoint(tmp_path):
    """UPerNet loading a pre-training-style checkpoint (backbone + decoder keys) with
    ITPNCheckpointer: every encoder and pyramid tensor equals the checkpoint's; a checkpoint
    of another pyramid depth is refused, naming the keys."""
    from itpn_d2.checkpoint import BackboneLoadError, ITPNCheckpointer

    torch.manual_seed(2)
    pre = ITPNBackbone(net=HiViT(**hivit_arch("tiny")), pyramid=FeaturePyramid(embed_dim=192, out_dim=32, depth=2))
    sd = {"backbone." + k: v for k, v in pre.state_dict().items()}
    sd["decoder_pred.weight"] = torch.randn(768, 512)  # pre-training only: dropped
    path = tmp_path / "pretrain.pth"
    torch.save({"model": sd}, path)

    model = build_tiny()
    ITPNCheckpointer(model).load(str(path), checkpointables=[])
    full = model.state_dict()
    backbone_keys = [k for k in full if k.startswith("backbone.")]
    assert len(backbone_keys) == len(sd) - 1
    for k in backbone_keys:
        assert torch.equal(full[k], sd[k]), k

    shallow = ITPNBackbone(net=HiViT(**hivit_arch("tiny")), pyramid=FeaturePyramid(embed_dim=192, out_dim=32, depth=1))
    bad = tmp_path / "depth1.pth"
    torch.save({"model": {"backbone." + k: v for k, v in shallow.state_dict().items()}}, bad)
    with pytest.raises(BackboneLoadError, match="block_16to8.1"):
        ITPNCheckpointer(build_tiny()).load(str(bad), checkpointables=[])


def _write_sem_seg_samples(folder, n_good=4, size=64):
    """``n_good`` readable image / label pairs, an unreadable image, an unreadable label map and
    a label map of the wrong size: dataset dicts as ``load_sem_seg`` makes them."""
    import cv2

    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    dicts = []

    def sample(name, image=True, label=True, label_size=size):
        img, lab = os.path.join(folder, f"{name}.jpg"), os.path.join(folder, f"{name}.png")
        if image:
            cv2.imwrite(img, rng.randint(0, 255, (size, size, 3), dtype=np.uint8))
        else:
            open(img, "wb").write(b"not a jpeg")
        if label:
            cv2.imwrite(lab, rng.randint(0, 7, (label_size, label_size)).astype(np.uint8))
        else:
            open(lab, "wb").write(b"not a png")
        dicts.append({"file_name": img, "sem_seg_file_name": lab, "height": size, "width": size})

    for i in range(n_good):
        sample(f"good{i}")
    sample("bad_image", image=False)
    sample("bad_label", label=False)
    sample("small_label", label_size=size // 2)
    return dicts


def test_ade20k_train_mapper_skips_and_counts_unreadable_images_and_labels(tmp_path, caplog):
    """configs/common/data/ade20k.py's training mapper: an unreadable image, an unreadable label
    map and a mis-sized one give None, one warning each naming the file, and are counted."""
    import logging

    cfg = LazyConfig.load(os.path.join(ROOT, "configs/common/data/ade20k.py"))
    mapper = instantiate(cfg.dataloader.train.mapper)
    dicts = {os.path.basename(d["file_name"]): d for d in _write_sem_seg_samples(str(tmp_path), n_good=1)}
    with caplog.at_level(logging.WARNING, logger="itpn_d2.data.safe_mapper"):
        assert mapper(dicts["bad_image.jpg"]) is None
        assert mapper(dicts["bad_label.jpg"]) is None
        assert mapper(dicts["small_label.jpg"]) is None
        good = mapper(dicts["good0.jpg"])
    assert good["skipped_images"] == 3 and mapper.num_skipped == 3
    assert good["image"].shape[1:] == good["sem_seg"].shape
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "bad_image.jpg" in warned and "bad_label.png" in warned and "small_label.png" in warned
    assert "label map of 32x32, image of 64x64" in warned


_SEG_SKIP_CONFIG = """
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog

_dicts = {dicts!r}
if "uper_skip_train" not in DatasetCatalog.list():
    DatasetCatalog.register("uper_skip_train", lambda: _dicts)
    MetadataCatalog.get("uper_skip_train").set(stuff_classes=[str(i) for i in range(7)], ignore_label=255)
_cfg = LazyConfig.load({base!r})
model, optimizer, lr_multiplier = _cfg.model, _cfg.optimizer, _cfg.lr_multiplier
train, dataloader = _cfg.train, _cfg.dataloader
dataloader.pop("evaluator")  # training only
dataloader.train.dataset.names = "uper_skip_train"
dataloader.train.num_workers = 0
dataloader.train.total_batch_size = 2
model.backbone.net.depth = 2
"""


@pytest.mark.slow
def test_segmentation_run_skips_and_counts_unreadable_samples(tmp_path):
    """A short UPerNet training through tools/lazyconfig_train_net.py (configs/ADE20K/uper_itpn_tiny_demo.py)
    on data with an unreadable image, an unreadable label map and a mis-sized one: the run finishes
    and its metrics count the skips (was: the first bad sample ended the run)."""
    import subprocess
    import sys

    from tests.helpers.train_cli import env_for, metrics

    dicts = _write_sem_seg_samples(str(tmp_path / "data"))
    cfg_file = tmp_path / "seg_cfg.py"
    cfg_file.write_text(_SEG_SKIP_CONFIG.format(
        dicts=dicts, base=os.path.join(ROOT, "configs/ADE20K/uper_itpn_tiny_demo.py")))
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"), "--config-file", str(cfg_file),
         f"train.output_dir={out}", "train.max_iter=5", "train.eval_period=0", "train.checkpointer.period=5",
         "train.log_period=1"],
        cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model_final.pth").exists()
    m = metrics(out)
    assert sorted(m) == list(range(5)) and all("skipped_images" in m[i] for i in m), m
    assert m[4]["skipped_images_total"] > 0 and sum(m[i]["skipped_images"] for i in m) == m[4]["skipped_images_total"]
    log = (out / "log.txt").read_text() + r.stderr
    assert "bad_image.jpg" in log or "bad_label.png" in log or "small_label.png" in log


def test_frozen_backbone_trains_only_the_head():
    """``model.backbone.frozen=True``: a training step over the layer-decay param groups changes
    every head tensor and no backbone tensor (the relative position tables made after the
    constructor included); the backbone stays in eval mode (no drop path) after
    ``model.train()``, and its maps equal the unfrozen backbone's in eval mode and carry no
    autograd graph."""
    from itpn_d2.lr_decay import layer_decay_param_groups

    cfg = tiny_uper_cfg()
    cfg.model.backbone.net.drop_path_rate = 0.5  # would change the maps if it ran
    cfg.model.backbone.net.rel_pos = True
    cfg.model.backbone.rel_pos_grid = 8
    torch.manual_seed(0)
    reference = instantiate(cfg.model).eval()
    cfg.model.backbone.frozen = True
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    model.train()
    assert model.training and model.sem_seg_head.training
    assert not model.backbone.training and not model.backbone.net.training
    assert any("relative_position_bias_table" in n for n, _ in model.backbone.named_parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())

    x = torch.randn(1, 3, 64, 64)
    maps = model.backbone(x)
    with torch.no_grad():
        expected = reference.backbone(x)
    for k in expected:
        assert not maps[k].requires_grad, k
        torch.testing.assert_close(maps[k], expected[k], rtol=0, atol=0)

    groups = layer_decay_param_groups(model, base_lr=1e-2, weight_decay=0.05, lr_factor_func=lambda n: 1.0)
    optimizer = torch.optim.AdamW(groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sum(model(_inputs()).values()).backward()
    optimizer.step()
    after = model.state_dict()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("sem_seg_head."), name


def test_the_frozen_demo_config_trains_the_head_alone():
    """configs/ADE20K/uper_itpn_tiny_demo_frozen.py (``make demo``'s segmentation stage): the
    backbone is frozen, and the config's own optimizer holds exactly the head's parameters."""
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/ADE20K/uper_itpn_tiny_demo_frozen.py"))
    model = instantiate(cfg.model)
    assert model.backbone.frozen
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    head = {id(p) for p in model.sem_seg_head.parameters()}
    assert held == head


def test_the_frozen_demo_config_is_a_stride_8_head_without_colour_jitter():
    """The frozen stage's time trade (its docstring): a stride-8 head (1.56x faster steps) whose finest
    level still reads the pyramid's p2, space-to-depth (the level where the detector learnt the
    shapes), at batch 2 for 2200 iterations (more images than the 8 x 450 of the batch-8 file, in
    five times the updates), evaluated and saved at the end of its own schedule; no auxiliary head (on a frozen backbone it would train
    only itself); ENet's class weights square-rooted; no dropout before the classifier; no
    PhotoMetricDistortion (a frozen backbone cannot adapt to it). The base demo config keeps the
    stride-4 head, the auxiliary head, the dropout, batch 8 and the jitter, as the integral ablation's
    saved recipe has them."""
    from itpn_d2.data.photometric import PhotoMetricDistortion

    cfg = LazyConfig.load(os.path.join(ROOT, "configs/ADE20K/uper_itpn_tiny_demo_frozen.py"))
    base = LazyConfig.load(os.path.join(ROOT, "configs/ADE20K/uper_itpn_tiny_demo.py"))
    model = instantiate(cfg.model)
    assert model.sem_seg_head.common_stride == 8
    assert instantiate(base.model).sem_seg_head.common_stride == 4
    # the backbone offers just the maps the head reads: p2 (with p3 and c3 at stride 8), not c2
    read = {name for group in cfg.model.sem_seg_head.in_features for name in group}
    assert set(model.backbone.output_shape()) == read and "p2" in read and "c2" not in read
    assert cfg.model.sem_seg_head.in_features[0] == ("p2", "p3", "c3")
    assert model.sem_seg_head.lateral_convs[0].in_channels == 4 * 64 + 64 + 96  # p2 space-to-depth, p3, c3
    kinds = [a._target_ for a in cfg.dataloader.train.mapper.augmentations]
    assert PhotoMetricDistortion not in kinds and len(kinds) == 2
    assert PhotoMetricDistortion in [a._target_ for a in base.dataloader.train.mapper.augmentations]
    assert cfg.train.max_iter == cfg.train.eval_period == cfg.train.checkpointer.period == 2200
    assert model.sem_seg_head.logit_upscale == 1  # stride-4 logits gave nothing at 2200 (the docstring)
    # mIoU and, beside it, the objects labelled with their own class
    from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator

    from itpn_d2.evaluation import ObjectLabelEvaluator

    assert cfg.dataloader.evaluator._target_ is DatasetEvaluators
    assert [e._target_ for e in cfg.dataloader.evaluator.evaluators] == [SemSegEvaluator, ObjectLabelEvaluator]
    assert cfg.dataloader.train.total_batch_size == 2 and base.dataloader.train.total_batch_size == 8
    assert model.sem_seg_head.aux_in_feature is None
    assert instantiate(base.model).sem_seg_head.aux_in_feature is not None
    # no dropout before the classifier here; the base file keeps UPerHead's 0.1
    assert isinstance(model.sem_seg_head.dropout, torch.nn.Identity)
    assert isinstance(instantiate(base.model).sem_seg_head.dropout, torch.nn.Dropout2d)
    # the base file's ENet class weights, square-rooted (background 1.25, the shapes 4.6-5.5)
    assert list(cfg.model.sem_seg_head.class_weight) == pytest.approx([w**0.5 for w in base.model.sem_seg_head.class_weight])
    assert cfg.model.sem_seg_head.class_weight[0] == pytest.approx(1.56**0.5)
