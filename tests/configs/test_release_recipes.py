"""The COCO and ADE20K configs train what the iTPN release trains.

The layer-decay tables below restate the release's two mmcv constructors from their source
(sunsmarterjie/iTPN ``det/mmcv_custom/layer_decay_optimizer_constructor.py`` and
``seg/mmcv_custom/itpn_layer_decay_optimizer_constructor.py``), written here independently of
``itpn_d2/lr_decay.py``; ``num_layers`` and the rates are those of the release configs
(``det/configs/itpn/*.py``, ``seg/configs/itpn/pixel_upernet_itpn_*``).
"""
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from torch import nn

from itpn_d2.config.overrides import apply_overrides
from itpn_d2.modeling import hivit_arch
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT


def _load(rel, *overrides):
    return apply_overrides(LazyConfig.load(os.path.join(ROOT, "configs", rel)), list(overrides))


# ---------------------------------------------------------------- the release's constructors
def release_det(name, shape, num_layers, rate):
    """(lr scale, no weight decay) of BEiT's LayerDecayOptimizerConstructor for an mmdet name."""
    n = num_layers + 2
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        layer_id = 0
    elif name.startswith("backbone.patch_embed"):
        layer_id = 0
    elif name.startswith("backbone.blocks"):
        layer_id = int(name.split(".")[2]) + 1
    else:
        layer_id = n - 1
    no_wd = len(shape) == 1 or name.endswith(".bias") or name.endswith("_token") or name.endswith("pos_embed")
    return rate ** (n - layer_id - 1), no_wd


def release_seg(name, shape, num_layers, rate):
    """(lr scale, no weight decay) of iTPNLayerDecayOptimizerConstructor for an mmseg name."""
    n = num_layers + 2
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.absolute_pos_embed"):
        layer_id = 0
    elif name.startswith("backbone.patch_embed"):
        layer_id = 0
    elif name.startswith("backbone.blocks"):
        layer_id = int(name.split(".")[2]) + 1
    else:
        layer_id = n - 1
    no_wd = len(shape) == 1 or name.endswith(".bias") or name in ("absolute_pos_embed", "cls_token")
    decay = rate ** (13 / n)
    return decay ** (n - layer_id - 1), no_wd


def release_name(ours):
    """Our encoder lives at ``backbone.net.*``, the release's at ``backbone.*``; the pyramid
    (``backbone.fpn_modules`` etc. there) and the heads are "anything else" in both."""
    if ours.startswith("backbone.net."):
        return "backbone." + ours[len("backbone.net.") :]
    return "neck_or_head." + ours


RECIPES = {
    # config: (constructor, release num_layers, rate)
    "COCO/mask_rcnn_itpn_base_1x.py": (release_det, 30, 0.90),
    "COCO/mask_rcnn_itpn_base_3x.py": (release_det, 30, 0.90),
    "COCO/mask_rcnn_itpn_large_1x.py": (release_det, 44, 0.95),
    "COCO/faster_rcnn_itpn_base_1x.py": (release_det, 30, 0.90),
    "COCO/cascade_mask_rcnn_itpn_base_3x.py": (release_det, 30, 0.90),
    "COCO/cascade_mask_rcnn_itpn_clip_base_3x.py": (release_det, 30, 0.90),
    "ADE20K/uper_itpn_base_160k.py": (release_seg, 30, 0.90),
    "ADE20K/uper_itpn_large_160k.py": (release_seg, 44, 0.95),
}


@pytest.mark.parametrize("rel", sorted(RECIPES))
def test_every_encoder_parameter_gets_the_release_factor(rel):
    constructor, num_layers, rate = RECIPES[rel]
    cfg = _load(rel)
    with torch.device("meta"):  # full base / large size, no memory
        model = nn.Module()
        model.backbone = instantiate(cfg.model.backbone)
        model.roi_heads = nn.Linear(4, 4)  # a head: "anything else"
    assert len(model.backbone.net.blocks) == num_layers + 2  # the release's num_layers + the 2 it adds
    cfg.optimizer.params.model = model
    groups = instantiate(cfg.optimizer.params)
    base = cfg.optimizer.lr
    got = {}
    for g in groups:
        for p in g["params"]:
            got[id(p)] = (g["lr"] / base, g["weight_decay"])
    named = list(model.named_parameters())
    assert len(got) == len(named)
    encoder = [n for n, _ in named if n.startswith("backbone.net.")]
    assert any(".patch_embed." in n for n in encoder) and "backbone.net.absolute_pos_embed" in encoder
    for name, p in named:
        want_lr, want_no_wd = constructor(release_name(name), tuple(p.shape), num_layers, rate)
        lr_scale, wd = got[id(p)]
        assert lr_scale == pytest.approx(want_lr, rel=1e-9), name
        assert wd == (0.0 if want_no_wd else 0.05), name


def test_pinned_release_numbers():
    """The quirks of the issue, as numbers (base: num_layers 30 + 2)."""
    f, _ = release_det("backbone.blocks.31.attn.qkv.weight", (3, 3), 30, 0.9)
    assert f == pytest.approx(1 / 0.9)  # the last block above the base lr
    assert release_det("backbone.patch_embed.proj.weight", (3, 3), 30, 0.9)[0] == pytest.approx(0.9**31)
    assert release_det("backbone.absolute_pos_embed", (1, 196, 512), 30, 0.9) == (1.0, True)
    seg_embed = release_seg("backbone.patch_embed.proj.weight", (3, 3), 30, 0.9)[0]
    assert seg_embed == pytest.approx(0.2654, abs=5e-4)  # "about 0.27 of the base lr, not 0.031"
    assert release_seg("backbone.absolute_pos_embed", (1, 196, 512), 30, 0.9) == (seg_embed, False)


def test_earlier_convention_stays_available_by_name():
    from itpn_d2.lr_decay import hivit_lr_factor_func

    f = hivit_lr_factor_func(rule="itpn_d2", lr_decay_rate=0.9, mlp_depths=(3, 3), depth=24)
    assert f("backbone.net.blocks.31.mlp.fc1.weight") == pytest.approx(0.9)
    assert f("backbone.net.absolute_pos_embed") == pytest.approx(0.9**33)
    with pytest.raises(ValueError, match="release_det"):
        hivit_lr_factor_func(rule="beit", lr_decay_rate=0.9, mlp_depths=(3, 3), depth=24)


# ---------------------------------------------------------------- ADE20K recipe values
@pytest.mark.parametrize("size,dp,embed", [("base", 0.1, 512), ("large", 0.2, 768)])
def test_ade20k_recipe_values(size, dp, embed):
    cfg = _load(f"ADE20K/uper_itpn_{size}_160k.py")
    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.optimizer.lr == pytest.approx(3e-5) and cfg.optimizer.weight_decay == 0.05
    assert tuple(cfg.optimizer.betas) == (0.9, 0.999)
    assert cfg.train.max_iter == 160000 and cfg.train.eval_period == cfg.train.checkpointer.period == 16000
    assert cfg.train.amp.enabled
    net = cfg.model.backbone.net
    assert net.embed_dim == embed and net.drop_path_rate == dp and net.rel_pos
    assert cfg.model.backbone.rel_pos_grid == 32 and cfg.model.backbone.pyramid.depth == 2
    assert cfg.train.new_by_design_keys == ["backbone.net.blocks.*.attn.relative_position_bias_table"]
    head = cfg.model.sem_seg_head
    assert (head.channels, tuple(head.pool_scales), head.norm, head.aux_loss_weight) == (768, (1, 2, 3, 6), "SyncBN", 0.4)
    assert tuple(cfg.model.crop_size) == (512, 512) and tuple(cfg.model.stride) == (341, 341)
    names = [a._target_.__name__ for a in cfg.dataloader.train.mapper.augmentations]
    assert names == ["ResizeShortestEdge", "RandomCrop_CategoryAreaConstraint", "RandomFlip", "PhotoMetricDistortion"]
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) == pytest.approx(1e-6) and sched(1499 / 160000) < 1.0
    assert sched(1500 / 160000) == pytest.approx(1 - 1500 / 160000)  # poly, power 1, to 0
    assert sched(0.5) == pytest.approx(0.5)
    half = _load(f"ADE20K/uper_itpn_{size}_160k.py", "dataloader.train.total_batch_size=8")
    assert half.optimizer.lr == pytest.approx(1.5e-5) and half.train.max_iter == 320000
    assert half.train.eval_period == 32000


@pytest.mark.parametrize("size", ["base", "large"])
def test_ade20k_optimizer_is_the_common_adamw_with_the_seg_constructor(size):
    """The ADE20K optimizer is ``configs/common/optim.py``'s (fused AdamW) with only the release's
    segmentation rules patched in: layer-scale and every other 1-D tensor without weight decay;
    the 2-D relative position tables decayed, as the release's constructor does."""
    cfg = _load(f"ADE20K/uper_itpn_{size}_160k.py")
    common = _load("COCO/mask_rcnn_itpn_base_1x.py").optimizer
    assert cfg.optimizer._target_ is common._target_ and cfg.optimizer.fused is True
    assert tuple(cfg.optimizer.betas) == tuple(common.betas) and cfg.optimizer.weight_decay == 0.05
    assert cfg.optimizer.params.lr_factor_func.rule == "release_seg"
    assert cfg.optimizer.params.no_weight_decay == "release_seg"
    cfg.model.backbone.net.update(hivit_arch("tiny"))
    cfg.model.backbone.net.layer_scale_init = 0.1  # the CLIP variant's layer-scale
    with torch.device("meta"):
        model = nn.Module()
        model.backbone = instantiate(cfg.model.backbone)
    cfg.optimizer.params.model = model
    decay = {}
    for g in instantiate(cfg.optimizer.params):
        for p in g["params"]:
            decay[id(p)] = g["weight_decay"]
    named = dict(model.named_parameters())
    scales = [n for n in named if n.split(".")[-1] in ("gamma_1", "gamma_2")]
    tables = [n for n in named if n.endswith("relative_position_bias_table")]
    assert scales and tables
    assert all(decay[id(named[n])] == 0.0 for n in scales), scales
    assert all(decay[id(named[n])] == 0.05 for n in tables), tables


# ---------------------------------------------------------------- strict loading with rpe
def _tiny_seg(rel_pos_grid=4):
    cfg = _load("ADE20K/uper_itpn_base_160k.py")
    cfg.model.backbone.net.update(hivit_arch("tiny"))
    cfg.model.backbone.rel_pos_grid = rel_pos_grid
    cfg.model.backbone.pyramid.out_dim = 32
    cfg.model.sem_seg_head.channels = 32
    cfg.model.sem_seg_head.aux_channels = 16
    cfg.model.sem_seg_head.num_classes = 5
    return cfg, instantiate(cfg.model)


def _pixel_checkpoint(tmp_path, drop=None):
    """A pixel pre-training checkpoint: encoder without relative position bias, depth-2 pyramid,
    plus pre-training-only tensors."""
    from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone

    torch.manual_seed(3)
    pre = ITPNBackbone(net=HiViT(**hivit_arch("tiny")), pyramid=FeaturePyramid(embed_dim=192, out_dim=32, depth=2))
    sd = {"backbone." + k: v for k, v in pre.state_dict().items()}
    if drop:
        del sd[drop]
    sd["decoder_pred.weight"] = torch.randn(8, 8)
    path = str(tmp_path / "pixel_pretrain.pth")
    torch.save({"model": sd}, path)
    return path, sd


def test_pixel_checkpoint_loads_strictly_with_exactly_the_rpe_tables_new(tmp_path, caplog):
    from itpn_d2.checkpoint import ITPNCheckpointer

    cfg, model = _tiny_seg()
    tables = sorted(k for k in model.state_dict() if k.endswith("relative_position_bias_table"))
    assert len(tables) == 6  # one per attention block of the tiny encoder
    assert all(model.state_dict()[k].shape == (7 * 7, 3) for k in tables)  # (2*4-1)^2 x heads
    path, sd = _pixel_checkpoint(tmp_path)
    ck = ITPNCheckpointer(model, backbone_load="strict", new_by_design=cfg.train.new_by_design_keys)
    with caplog.at_level(logging.INFO):
        ck.load(path, checkpointables=[])
    report = ck.last_load_report
    assert sorted(report["new_by_design"]) == tables
    assert report["reinitialised"] == []
    assert report["encoder"] + report["pyramid"] == len(sd) - 1
    assert "new by design, zero-initialised" in caplog.text
    state = model.state_dict()
    assert all(torch.count_nonzero(state[k]) == 0 for k in tables)
    assert all(torch.equal(state[k], v) for k, v in sd.items() if k.startswith("backbone."))
    # the zero tables are the identity of attention: the segmenter trains from the pixel features
    model.train()
    imgs = [{"image": torch.randint(0, 255, (3, 64, 64)).float(), "sem_seg": torch.randint(0, 5, (64, 64))}
            for _ in range(2)]  # 2: the pooling branch's BN needs more than one value per channel
    losses = model(imgs)
    sum(losses.values()).backward()
    assert model.backbone.net.blocks[4].attn.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "drop", ["backbone.net.blocks.4.attn.qkv.weight", "backbone.pyramid.block_16to8.1.mlp.fc1.weight",
             "backbone.net.absolute_pos_embed"]
)
def test_any_other_missing_tensor_is_still_refused(tmp_path, drop):
    from itpn_d2.checkpoint import BackboneLoadError, ITPNCheckpointer

    cfg, model = _tiny_seg()
    path, _ = _pixel_checkpoint(tmp_path, drop=drop)
    with pytest.raises(BackboneLoadError) as e:
        ITPNCheckpointer(model, new_by_design=cfg.train.new_by_design_keys).load(path, checkpointables=[])
    assert drop in str(e.value) and "relative_position_bias_table" not in str(e.value)


def test_without_the_declaration_the_tables_are_refused(tmp_path):
    """A config that does not declare them (or the --eval-only path) refuses the same file."""
    from itpn_d2.checkpoint import BackboneLoadError, ITPNCheckpointer

    _, model = _tiny_seg()
    path, _ = _pixel_checkpoint(tmp_path)
    with pytest.raises(BackboneLoadError, match="relative_position_bias_table"):
        ITPNCheckpointer(model).load(path, checkpointables=[])


def test_a_mis_shaped_declared_table_is_refused(tmp_path):
    from itpn_d2.checkpoint import BackboneLoadError, ITPNCheckpointer

    cfg, model = _tiny_seg(rel_pos_grid=4)
    _, other = _tiny_seg(rel_pos_grid=5)
    path = str(tmp_path / "finetuned.pth")
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(BackboneLoadError, match="shape mismatch"):
        ITPNCheckpointer(model, new_by_design=cfg.train.new_by_design_keys).load(path, checkpointables=[])


def test_rel_pos_grid_needs_rel_pos():
    cfg = _load("ADE20K/uper_itpn_base_160k.py")
    cfg.model.backbone.net.update(hivit_arch("tiny"))
    cfg.model.backbone.net.rel_pos = False
    with pytest.raises(ValueError, match="net.rel_pos"):
        instantiate(cfg.model.backbone)


# ---------------------------------------------------------------- PhotoMetricDistortion
def test_photometric_distortion_matches_mmseg_steps(monkeypatch):
    import cv2

    from itpn_d2.data.photometric import PhotoMetricDistortion

    img = np.random.RandomState(0).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    # every step on, contrast last (mode 0), fixed draws
    draws = iter([1, 0, 1, 1, 1])  # brightness on, mode 0, contrast on, saturation on, hue on
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(draws) if len(a) == 1 or a == (2,) else 7)
    uni = iter([10.0, 1.2, 0.8])  # brightness delta, contrast alpha, saturation alpha
    monkeypatch.setattr(np.random, "uniform", lambda *a, **k: next(uni))
    out = PhotoMetricDistortion(image_format="RGB").get_transform(img).apply_image(img)
    # the same four steps written out (mmseg order: brightness, saturation, hue, contrast)
    x = np.clip(img.astype(np.float32) + 10.0, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * 0.8, 0, 255).astype(np.uint8)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + 7) % 180
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    x = np.clip(x.astype(np.float32) * 1.2, 0, 255).astype(np.uint8)
    assert out.dtype == np.uint8 and np.array_equal(out, x)


def test_photometric_distortion_leaves_labels_and_applies_half_the_time():
    from itpn_d2.data.photometric import PhotoMetricDistortion

    np.random.seed(0)
    aug = PhotoMetricDistortion()
    img = np.full((16, 16, 3), 100, np.uint8)
    img[:, 8:] = (30, 160, 220)
    lab = np.random.randint(0, 5, (16, 16)).astype(np.uint8)
    changed = 0
    for _ in range(200):
        t = aug.get_transform(img)
        assert np.array_equal(t.apply_segmentation(lab), lab)
        changed += not np.array_equal(t.apply_image(img.copy()), img)
    assert 170 < changed < 200  # unchanged only when all four coins say no (1/16)


def test_training_script_passes_the_declaration_and_eval_only_does_not(tmp_path):
    from itpn_d2.engine.lazyconfig_run import make_checkpointer

    cfg, model = _tiny_seg()
    cfg.train.output_dir = str(tmp_path)
    path, _ = _pixel_checkpoint(tmp_path)
    ck = make_checkpointer(cfg, model)
    ck.resume_or_load(path, resume=False)
    assert len(ck.last_load_report["new_by_design"]) == 6
    from itpn_d2.checkpoint import BackboneLoadError

    with pytest.raises(BackboneLoadError):  # --eval-only wants a trained model: every tensor
        make_checkpointer(cfg, model, backbone_load="strict", new_by_design=[]).load(path)


def test_tiny_segmentation_demo_loads_the_tiny_pretraining_checkpoint_strictly(tmp_path):
    """configs/ADE20K/uper_itpn_tiny_demo.py fits configs/pretrain/mim_mfm_itpn_tiny_cpu.py:
    every encoder and pyramid tensor from the file, none re-initialised, none new."""
    from itpn_d2.checkpoint import ITPNCheckpointer

    pre_cfg = _load("pretrain/mim_mfm_itpn_tiny_cpu.py")
    torch.manual_seed(0)
    pre = instantiate(pre_cfg.model)
    path = str(tmp_path / "tiny_pretrain.pth")
    torch.save({"model": pre.state_dict()}, path)
    cfg = _load("ADE20K/uper_itpn_tiny_demo.py")
    assert cfg.dataloader.train.dataset.names == "itpn_synthetic_sem_seg_train"
    assert cfg.dataloader.evaluator._target_.__name__ == "SemSegEvaluator"
    assert cfg.optimizer.params.lr_factor_func.rule == "release_seg"
    model = instantiate(cfg.model)
    ck = ITPNCheckpointer(model, backbone_load="strict", new_by_design=cfg.train.new_by_design_keys)
    ck.load(path, checkpointables=[])
    r = ck.last_load_report
    assert r["reinitialised"] == [] and r["new_by_design"] == [] and r["encoder"] > 0 and r["pyramid"] > 0
    # the warm-up is a tenth of the run, also when the run is shortened on the command line
    short = _load("ADE20K/uper_itpn_tiny_demo.py", "train.max_iter=40")
    sched = instantiate(short.lr_multiplier)
    assert sched(4 / 40) == pytest.approx(1 - 4 / 40)  # warm-up over after 4 iterations, then poly
    assert sched(3 / 40) < 0.8 * (1 - 3 / 40)
