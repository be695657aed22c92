"""ITPNCheckpointer: exact strict loading, refusals with key lists, safe file reading."""
import argparse
import logging

import pytest
import torch
import torch.nn as nn

from itpn_d2.checkpoint import (
    BackboneLoadError,
    CheckpointFileError,
    ITPNCheckpointer,
    load_checkpoint_file,
)
from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone, hivit_arch


def _backbone(size="tiny", mlp_depths=None, fpn_depth=2, seed=0):
    torch.manual_seed(seed)
    arch = hivit_arch(size)
    if mlp_depths:
        arch["mlp_depths"] = mlp_depths
    net = HiViT(**arch)
    return ITPNBackbone(net=net, pyramid=FeaturePyramid(embed_dim=net.embed_dim, out_dim=64, depth=fpn_depth))


class Detector(nn.Module):
    """Stands in for a meta-architecture: an ITPNBackbone under `backbone` plus a head."""

    def __init__(self, **kw):
        super().__init__()
        self.backbone = _backbone(**kw)
        self.head = nn.Linear(64, 5)


class Pretrainer(nn.Module):
    """A pre-training model: the same backbone plus decoder / mask token / teacher."""

    def __init__(self, **kw):
        super().__init__()
        self.backbone = _backbone(**kw)
        self.decoder_embed = nn.Linear(64, 32)
        self.mask_token = nn.Parameter(torch.randn(1, 1, 32))
        self.teacher = nn.Linear(8, 8)


def load_init_checkpoint(model, path, mode="strict"):
    """``train.init_checkpoint`` loaded as tools/lazyconfig_train_net.py loads it (no --resume)."""
    ck = ITPNCheckpointer(model, backbone_load=mode)
    ck.resume_or_load(path, resume=False)
    return ck.last_load_report


class Custom:
    """An arbitrary class in a checkpoint (like mmengine's HistoryBuffer): refused unless allowed."""


def _perturb(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _save_pretrain(tmp_path, name="pre.pth", extra=None, **kw):
    pre = Pretrainer(**kw)
    _perturb(pre)
    data = {"model": pre.state_dict()}
    data.update(extra or {})
    path = str(tmp_path / name)
    torch.save(data, path)
    return pre, path


def test_strict_load_every_backbone_tensor_equal(tmp_path, caplog):
    pre, path = _save_pretrain(tmp_path)
    det = Detector(seed=5)
    head_before = det.head.weight.clone()
    with caplog.at_level(logging.INFO):
        report = load_init_checkpoint(det, path)
    ref = pre.state_dict()
    n = 0
    for k, v in det.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(v, ref[k]), k
            n += 1
    assert n == len([k for k in ref if k.startswith("backbone.")])
    assert torch.equal(det.head.weight, head_before)  # heads keep their init
    assert report["encoder"] == sum(k.startswith("backbone.net.") for k in ref)
    assert report["pyramid"] == sum(k.startswith("backbone.pyramid.") for k in ref)
    assert report["reinitialised"] == []
    assert sorted(report["dropped"]) == sorted(k for k in ref if not k.startswith("backbone."))
    text = caplog.text
    assert f"{report['encoder']} encoder tensors, {report['pyramid']} pyramid tensors" in text
    assert "0 backbone tensors re-initialised" in text
    assert "decoder_embed" in text and "mask_token" in text and "teacher" in text


def test_missing_pyramid_block_refused_with_keys(tmp_path):
    _, path = _save_pretrain(tmp_path, fpn_depth=1)  # a depth-1 pyramid into a depth-2 model
    det = Detector(fpn_depth=2)
    with pytest.raises(BackboneLoadError) as e:
        load_init_checkpoint(det, path)
    msg = str(e.value)
    assert path in msg
    assert "backbone.pyramid.block_16to8.1.mlp.fc1.weight" in msg
    assert "backbone.pyramid.block_8to4.1.norm2.bias" in msg


def test_deeper_pyramid_in_checkpoint_refused(tmp_path):
    # The reference silently dropped block_*.1 (finding 5); we refuse unless asked for "partial".
    _, path = _save_pretrain(tmp_path, fpn_depth=2)
    with pytest.raises(BackboneLoadError, match=r"block_16to8\.1"):
        load_init_checkpoint(Detector(fpn_depth=1), path)
    det = Detector(fpn_depth=1)
    report = load_init_checkpoint(det, path, mode="partial")
    assert report["reinitialised"] == []


def test_wrong_size_refused_listing_shapes(tmp_path):
    _, path = _save_pretrain(tmp_path, size="small", mlp_depths=(1, 1))
    with pytest.raises(BackboneLoadError) as e:
        load_init_checkpoint(Detector(size="tiny"), path)
    msg = str(e.value)
    # name, checkpoint shape, model shape
    assert "backbone.net.patch_embed.proj.weight: (96, 3, 4, 4) vs (48, 3, 4, 4)" in msg
    assert "backbone.net.blocks.9.attn.qkv.weight" in msg  # small has more attention blocks ...
    assert "backbone.net.blocks.15.attn.qkv.weight" in msg  # ... listed as unexpected
    assert path in msg


def test_other_block_layout_refused(tmp_path):
    # a 2/2 (mmpretrain-like) file into a 1/1 model: indices shift, shapes differ -> refused
    _, path = _save_pretrain(tmp_path, mlp_depths=(2, 2))
    with pytest.raises(BackboneLoadError, match=r"backbone\.net\.blocks\.2\.reduction\.weight"):
        load_init_checkpoint(Detector(), path)


def test_encoder_only_keeps_pyramid_init(tmp_path):
    pre, path = _save_pretrain(tmp_path, fpn_depth=1)
    det = Detector(fpn_depth=2, seed=7)
    pyr_before = {k: v.clone() for k, v in det.backbone.pyramid.state_dict().items()}
    report = load_init_checkpoint(det, path, mode="encoder_only")
    for k, v in det.backbone.net.state_dict().items():
        assert torch.equal(v, pre.backbone.net.state_dict()[k]), k
    for k, v in det.backbone.pyramid.state_dict().items():
        assert torch.equal(v, pyr_before[k]), k
    assert report["pyramid"] == 0
    assert len(report["reinitialised"]) == len(pyr_before)
    # ... but the encoder is still checked strictly
    _, other = _save_pretrain(tmp_path, name="small.pth", size="small", mlp_depths=(1, 1))
    with pytest.raises(BackboneLoadError):
        load_init_checkpoint(Detector(), other, mode="encoder_only")


def test_no_matching_heuristics(tmp_path):
    # With heuristics, a bare "norm.weight"-style key could land anywhere; we ignore the flag and
    # load by exact names, so a file with only suffix-matching names is refused.
    pre = Pretrainer()
    sd = {k.replace("backbone.", "", 1).replace("net.", "encoder.", 1): v for k, v in pre.state_dict().items()}
    path = str(tmp_path / "heur.pth")
    torch.save({"model": sd, "matching_heuristics": True}, path)
    with pytest.raises(BackboneLoadError, match="missing in the checkpoint"):
        load_init_checkpoint(Detector(), path)


def test_module_prefix_and_bare_backbone(tmp_path):
    pre = Pretrainer()
    _perturb(pre)
    path = str(tmp_path / "bare.pth")
    torch.save({"model": {"module." + k: v for k, v in pre.backbone.state_dict().items()}}, path)
    det = Detector(seed=3)
    load_init_checkpoint(det, path)
    for k, v in det.backbone.state_dict().items():
        assert torch.equal(v, pre.backbone.state_dict()[k])


def test_resume_own_checkpoint_roundtrip(tmp_path):
    det = Detector()
    _perturb(det)
    ck = ITPNCheckpointer(det, save_dir=str(tmp_path))
    ck.save("model_x")
    det2 = Detector(seed=9)
    ITPNCheckpointer(det2, save_dir=str(tmp_path)).resume_or_load(str(tmp_path / "model_x.pth"), resume=True)
    for k, v in det2.state_dict().items():
        assert torch.equal(v, det.state_dict()[k])


def test_weights_only_namespace_and_unsafe_flag(tmp_path, monkeypatch):
    pre = Pretrainer()
    path = str(tmp_path / "official.pth")
    torch.save({"model": pre.state_dict(), "args": argparse.Namespace(lr=1e-3, model="itpn_base")}, path)
    data = load_checkpoint_file(path)  # safe-listed class: loads with weights_only=True
    assert data["args"].model == "itpn_base"

    path2 = str(tmp_path / "custom.pth")
    torch.save({"model": pre.state_dict(), "meta": Custom()}, path2)
    monkeypatch.delenv("ITPN_D2_ALLOW_UNSAFE_LOAD", raising=False)
    with pytest.raises(CheckpointFileError) as e:
        load_checkpoint_file(path2)
    assert path2 in str(e.value) and "Custom" in str(e.value)
    with pytest.raises(CheckpointFileError):
        load_init_checkpoint(Detector(), path2)
    assert isinstance(load_checkpoint_file(path2, allow_unsafe=True)["meta"], Custom)
    monkeypatch.setenv("ITPN_D2_ALLOW_UNSAFE_LOAD", "1")
    load_init_checkpoint(Detector(), path2)


def test_truncated_and_garbage_files(tmp_path):
    _, path = _save_pretrain(tmp_path)
    raw = open(path, "rb").read()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointFileError, match="truncated.pth"):
        load_init_checkpoint(Detector(), str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointFileError, match="junk.pth"):
        load_checkpoint_file(str(junk))
    with pytest.raises(CheckpointFileError, match="not found"):
        load_checkpoint_file(str(tmp_path / "nope.pth"))


def test_bad_mode():
    with pytest.raises(ValueError, match="backbone_load"):
        ITPNCheckpointer(Detector(), backbone_load="loose")


def test_encoder_only_applies_to_pretrained_weights_not_to_resume(tmp_path):
    """With backbone_load='encoder_only' the pyramid of the *pre-training* file is skipped, but
    resuming the run's own checkpoint restores the fine-tuned pyramid (never re-initialised)."""
    pre = Pretrainer(seed=0)
    pre_path = str(tmp_path / "pre.pth")
    torch.save({"model": pre.state_dict()}, pre_path)
    out = tmp_path / "run"

    model = Detector(seed=1)
    init_pyramid = {k: v.clone() for k, v in model.backbone.pyramid.state_dict().items()}
    ck = ITPNCheckpointer(model, str(out), backbone_load="encoder_only")
    ck.resume_or_load(pre_path, resume=True)  # no checkpoint yet: the pre-trained file, encoder only
    for k, v in model.backbone.pyramid.state_dict().items():
        assert torch.equal(v, init_pyramid[k]), k
    for k, v in model.backbone.net.state_dict().items():
        assert torch.equal(v, pre.backbone.net.state_dict()[k]), k

    _perturb(model.backbone.pyramid, seed=3)  # "fine-tuning"
    ck.save("model_0000009")
    tuned = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = Detector(seed=2)
    ITPNCheckpointer(resumed, str(out), backbone_load="encoder_only").resume_or_load(pre_path, resume=True)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, tuned[k]), k
