"""Bad input never loses work: every case asserts the message AND that the dataset files,
existing checkpoints and outputs are unchanged (hashes before / after).

Pre-training folder and COCO dataset: corrupt, truncated, zero-byte and non-image files are
skipped, counted, and named once in the log; grayscale, RGBA and 16-bit images are read.
COCO annotations with a zero-width box or an empty mask neither crash nor give NaN.
Checkpoints of another architecture (keys listed) and truncated checkpoints (file named, one
line, no traceback) are refused by the training script; so is an unknown config key.
Images smaller than a mask unit or not divisible by 16: padded (Mask R-CNN), cropped to size
(pre-training mapper), or refused with a clear ValueError (the encoder used directly).
"""
import json
import logging
import os
import shutil
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.events import EventStorage
from PIL import Image
from pycocotools import mask as mask_util

from tests.helpers.train_cli import (
    PRETRAIN_CFG,
    ROOT,
    TINY_OVERRIDES,
    checkpoint_state,
    env_for,
    error_line,
    hash_tree,
    make_image_folder,
    run,
    train_cmd,
)
from itpn_d2.data.image_folder import register_image_folder
from itpn_d2.config.overrides import ConfigOverrideError, apply_overrides

MIM_LOGGER = "itpn_d2.data.mim_mapper"
SAFE_LOGGER = "itpn_d2.data.safe_mapper"


pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth(rng, h, w, c=3, dtype=np.uint8, top=255):
    low = rng.integers(0, top + 1, size=(4, 4, c)).astype(np.float32)
    im = torch.nn.functional.interpolate(torch.from_numpy(low).permute(2, 0, 1)[None], size=(h, w), mode="bilinear")
    return im[0].permute(1, 2, 0).numpy().astype(dtype)


def _write_bad_files(folder, good_png):
    """corrupt / truncated / zero-byte / non-image files; returns their paths."""
    bad = {
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)),
        "truncated.png": open(good_png, "rb").read()[: os.path.getsize(good_png) // 2],
        "empty.png": b"",
        "notes.jpg": b"this is a text file with an image extension\n",
    }
    paths = []
    for name, data in bad.items():
        p = os.path.join(folder, name)
        with open(p, "wb") as f:
            f.write(data)
        paths.append(p)
    return paths


def _write_odd_images(folder, rng):
    """grayscale, RGBA, 16-bit grayscale, and one smaller than a 16 px mask unit."""
    paths = {}
    paths["gray"] = os.path.join(folder, "gray.png")
    Image.fromarray(_smooth(rng, 70, 60, 1)[:, :, 0], "L").save(paths["gray"])
    paths["rgba"] = os.path.join(folder, "rgba.png")
    Image.fromarray(np.concatenate([_smooth(rng, 64, 80), np.full((64, 80, 1), 90, np.uint8)], 2), "RGBA").save(
        paths["rgba"]
    )
    paths["gray16"] = os.path.join(folder, "gray16.png")
    Image.fromarray(_smooth(rng, 66, 66, 1, np.uint16, 65535)[:, :, 0]).save(paths["gray16"])
    paths["tiny"] = os.path.join(folder, "tiny.png")
    Image.fromarray(_smooth(rng, 7, 10)).save(paths["tiny"])
    return paths


# --------------------------------------------------------------------------- pre-training folder


def test_pretraining_folder_with_bad_and_odd_files(tmp_path, caplog):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    make_image_folder(tmp_path / "ds", n=4)
    shutil.copytree(tmp_path / "ds" / "imagenet" / "train", root)
    folder = str(root / "n000")
    odd = _write_odd_images(folder, rng)
    bad = _write_bad_files(folder, os.path.join(folder, "img000.png"))
    before = hash_tree(root)

    name = f"fault_{uuid.uuid4().hex[:8]}"
    register_image_folder(name, str(root))
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/common/data/pretrain_folder.py"))
    cfg.dataloader.train.dataset.names = name
    cfg.dataloader.train.mapper.image_size = 32
    cfg.dataloader.train.total_batch_size = 4
    cfg.dataloader.train.num_workers = 0
    loader = instantiate(cfg.dataloader.train)
    mapper = loader.dataset.mapper
    seen_files, skipped = set(), 0
    with caplog.at_level(logging.WARNING, logger=MIM_LOGGER):
        it = iter(loader)
        for _ in range(12):  # 48 samples: > 3 passes over the 12 files
            batch = next(it)
            for d in batch:
                assert d["image"].shape == (3, 32, 32) and torch.isfinite(d["image"]).all()
                seen_files.add(d["file_name"])
                skipped += d["skipped_images"]
    # odd images (grayscale, RGBA, 16-bit, smaller than a mask unit) are used, bad ones never
    assert set(odd.values()) <= seen_files and not set(bad) & seen_files
    assert mapper.num_skipped >= len(bad)
    assert skipped == mapper.num_skipped - mapper._pending_skips, "every skip is counted once on a sample"
    warned = [r.getMessage() for r in caplog.records if r.name == MIM_LOGGER]
    for b in bad:
        assert sum(f"'{b}'" in m for m in warned) == 1, (b, warned)
    assert len(warned) == len(bad)
    assert hash_tree(root) == before


# --------------------------------------------------------------------------- COCO


def _poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _make_coco(tmp_path, rng):
    img_dir = tmp_path / "coco" / "images"
    img_dir.mkdir(parents=True)
    images, anns = [], []

    def add_image(fname, h, w, boxes):
        iid = len(images) + 1
        images.append({"id": iid, "file_name": fname, "height": h, "width": w})
        for b in boxes:
            ann = {"id": len(anns) + 1, "image_id": iid, "category_id": 1, "iscrowd": 0, "bbox": b["bbox"],
                   "area": float(b["bbox"][2] * b["bbox"][3]), "segmentation": b["seg"]}
            anns.append(ann)

    box = {"bbox": [10, 12, 30, 24], "seg": _poly(10, 12, 30, 24)}
    for i in range(3):
        Image.fromarray(_smooth(rng, 64, 80)).save(img_dir / f"good{i}.png")
        add_image(f"good{i}.png", 64, 80, [box])
    odd = _write_odd_images(str(img_dir), rng)
    for k, (h, w) in {"gray": (70, 60), "rgba": (64, 80), "gray16": (66, 66)}.items():
        add_image(os.path.basename(odd[k]), h, w, [box])
    os.remove(odd["tiny"])
    bad = _write_bad_files(str(img_dir), str(img_dir / "good0.png"))
    for p in bad:
        add_image(os.path.basename(p), 64, 80, [box])
    # degenerate annotations: a zero-width box (and its zero-area polygon), an all-empty RLE mask
    Image.fromarray(_smooth(rng, 64, 80)).save(img_dir / "degenerate.png")
    empty_rle = mask_util.encode(np.asfortranarray(np.zeros((64, 80), np.uint8)))
    empty_rle["counts"] = empty_rle["counts"].decode("ascii")
    degenerate = [
        {"bbox": [20, 20, 0, 16], "seg": [[20, 20, 20, 36, 20, 28]]},
        {"bbox": [30, 10, 20, 20], "seg": empty_rle},
    ]
    add_image("degenerate.png", 64, 80, degenerate + [box])  # + one good instance
    Image.fromarray(_smooth(rng, 64, 80)).save(img_dir / "all_degenerate.png")
    add_image("all_degenerate.png", 64, 80, degenerate)
    ann_file = tmp_path / "coco" / "train.json"
    ann_file.write_text(json.dumps({
        "images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}],
    }))
    return img_dir, ann_file, bad, odd


def _tiny_maskrcnn_cfg(name):
    import detectron2.data.transforms as T
    from detectron2.config import LazyCall as L

    cfg = LazyConfig.load(os.path.join(ROOT, "configs/COCO/mask_rcnn_itpn_tiny_demo.py"))
    cfg.model.backbone.net.depth = 2
    cfg.dataloader.train.dataset.names = name
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=96, max_size=128)]
    return cfg


def test_coco_with_bad_files_degenerate_annotations_and_small_images(tmp_path, caplog):
    rng = np.random.default_rng(0)
    img_dir, ann_file, bad, odd = _make_coco(tmp_path, rng)
    before = hash_tree(tmp_path / "coco")
    name = f"fault_coco_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(ann_file), str(img_dir))
    cfg = _tiny_maskrcnn_cfg(name)
    torch.manual_seed(0)
    loader = instantiate(cfg.dataloader.train)
    seen, skipped = set(), 0
    with caplog.at_level(logging.WARNING, logger=SAFE_LOGGER):
        it = iter(loader)
        batches = [next(it) for _ in range(12)]  # 24 samples over 11 listed images
    for batch in batches:
        for d in batch:
            seen.add(os.path.basename(d["file_name"]))
            skipped += d["skipped_images"]
            assert d["image"].shape[0] == 3 and d["image"].dtype == torch.uint8
    assert not {os.path.basename(b) for b in bad} & seen
    assert {"gray.png", "rgba.png", "gray16.png"} <= seen
    warned = [r.getMessage() for r in caplog.records if r.name == SAFE_LOGGER]
    for b in bad:
        assert sum(f"'{b}'" in m for m in warned) == 1, (b, warned)
    assert skipped >= 1

    # degenerate annotations: detectron2's mapper drops the zero-width box and the empty mask
    # (filter_empty_instances); an image left with no instance still trains, with finite losses
    from detectron2.data import DatasetCatalog

    mapper = instantiate(cfg.dataloader.train.mapper)
    dicts = {os.path.basename(d["file_name"]): d for d in DatasetCatalog.get(name)}
    assert len(dicts["degenerate.png"]["annotations"]) == 3  # all three reach the mapper
    one = mapper(dicts["degenerate.png"])["instances"]
    assert len(one) == 1 and float(one.gt_masks.tensor.sum()) > 0
    none = mapper(dicts["all_degenerate.png"])
    assert len(none["instances"]) == 0
    model = instantiate(cfg.model).train()
    with EventStorage(0):
        for b in ([none, batches[0][0]], [none], batches[1]):
            losses = model(b)
            total = sum(losses.values())
            assert torch.isfinite(total), losses
            total.backward()

    # images smaller than a mask unit / not divisible by 16: detectron2 pads them for the backbone
    model.eval()
    with torch.no_grad():
        for h, w in ((7, 10), (37, 50)):
            out = model([{"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8), "height": h, "width": w}])
            assert out[0]["instances"].image_size == (h, w)
    assert hash_tree(tmp_path / "coco") == before


def test_encoder_refuses_sizes_it_cannot_split_into_mask_units():
    from itpn_d2.modeling import HiViT
    from itpn_d2.modeling.decoder import PixelDecoder
    from itpn_d2.modeling.masking import RandomMaskGenerator
    from itpn_d2.modeling.pretrainer import MaskedPretrainer
    from itpn_d2.modeling import FeaturePyramid, ITPNBackbone

    net = HiViT(embed_dim=32, mlp_depths=(1, 1), depth=1, num_heads=2, pretrain_img_size=64)
    for h, w in ((8, 8), (40, 48)):
        with pytest.raises(ValueError, match=f"multiple of 16 pixels on each side; got {h}x{w}"):
            net(torch.zeros(1, 3, h, w))
    model = MaskedPretrainer(
        backbone=ITPNBackbone(net=net, pyramid=FeaturePyramid(embed_dim=32, out_dim=16, depth=1)),
        mask_generator=RandomMaskGenerator(),
        pixel_decoder=PixelDecoder(in_dim=16, dec_dim=16, depth=1, num_heads=2, pretrain_img_size=64),
        pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1],
    )
    with pytest.raises(ValueError, match=r"multiples of 16, got \(3, 40, 48\)"):
        model([{"image": torch.zeros(3, 40, 48)}])


# --------------------------------------------------------------------------- checkpoints and config, via the CLI


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A dataset, a checkpoint of the CLI's model and one of another architecture."""
    tmp = tmp_path_factory.mktemp("cli")
    datasets = tmp / "datasets"
    make_image_folder(datasets, n=4)

    def build(extra):
        cfg = LazyConfig.load(PRETRAIN_CFG)
        cfg = apply_overrides(cfg, [o for o in TINY_OVERRIDES if o.startswith("model.")] + extra)
        torch.manual_seed(0)
        return instantiate(cfg.model)

    good = tmp / "good.pth"
    torch.save({"model": build([]).state_dict()}, good)
    foreign = tmp / "foreign.pth"
    torch.save({"model": build(["model.backbone.net.depth=3"]).state_dict()}, foreign)
    return tmp, datasets, good, foreign


def _no_traceback(stderr):
    assert "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_cli_refuses_a_checkpoint_of_another_architecture(cli, tmp_path):
    tmp, datasets, _, foreign = cli
    before = hash_tree(tmp, skip=("datasets",))
    out = tmp_path / "out"
    r = run(train_cmd(out, "train.max_iter=2", f"train.init_checkpoint={foreign}"), env_for(datasets))
    assert r.returncode == 1
    _no_traceback(r.stderr)
    assert f"ERROR: checkpoint {foreign} does not fit this model's backbone" in r.stderr
    assert "in the checkpoint but not in the model" in r.stderr
    assert "backbone.net.blocks.6.attn.qkv.weight" in r.stderr  # the extra attention block, listed
    assert hash_tree(tmp, skip=("datasets",)) == before
    assert not checkpoint_state(out), "nothing was trained or saved"


@pytest.mark.slow
def test_cli_truncated_checkpoint_is_one_clear_line(cli, tmp_path):
    tmp, datasets, good, _ = cli
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    before = hash_tree(tmp_path)
    r = run(train_cmd(tmp_path / "out", "train.max_iter=2", f"train.init_checkpoint={trunc}"), env_for(datasets))
    assert r.returncode == 1
    _no_traceback(r.stderr)
    err = error_line(r.stderr)
    assert err and err.startswith(f"ERROR: cannot read checkpoint file {trunc}") and "truncated or corrupt" in err
    after = hash_tree(tmp_path)
    assert {k: after.get(k) for k in before} == before  # the new run directory only gained its logs

    # the same when --resume meets a truncated last checkpoint (e.g. a disk that filled up)
    out = tmp_path / "resume"
    out.mkdir()
    shutil.copy(trunc, out / "model_0000001.pth")
    (out / "last_checkpoint").write_text("model_0000001.pth")
    before = checkpoint_state(out)
    r = run(train_cmd(out, "train.max_iter=4", resume=True), env_for(datasets))
    assert r.returncode == 1
    _no_traceback(r.stderr)
    assert error_line(r.stderr).startswith(f"ERROR: cannot read checkpoint file {out / 'model_0000001.pth'}")
    assert checkpoint_state(out) == before


@pytest.mark.slow
def test_cli_unknown_config_key(cli, tmp_path):
    _, datasets, _, _ = cli
    out = tmp_path / "out"
    r = run(train_cmd(out, "train.max_itr=2"), env_for(datasets))
    assert r.returncode == 2
    _no_traceback(r.stderr)
    err = error_line(r.stderr)
    assert err.startswith("ERROR: unknown config key 'train.max_itr'") and "did you mean 'train.max_iter'" in err
    assert not out.exists(), "refused before anything was written"


def test_override_keys_are_checked_against_the_config_and_the_called_objects():
    cfg = LazyConfig.load(PRETRAIN_CFG)
    # an argument the config leaves at its default (HiViT's qkv_bias), an added key, an optional key
    apply_overrides(cfg, ["model.backbone.net.qkv_bias=False", "+train.my_note=1", "train.backbone_load=partial"])
    assert cfg.model.backbone.net.qkv_bias is False and cfg.train.my_note == 1
    with pytest.raises(ConfigOverrideError, match=r"unknown config key 'model.backbone.net.qkv_biass'.*'model.backbone.net.qkv_bias'"):
        apply_overrides(cfg, ["model.backbone.net.qkv_biass=False"])
    with pytest.raises(ConfigOverrideError, match="'train.max_iter' is a value"):
        apply_overrides(cfg, ["train.max_iter.x=1"])
    with pytest.raises(ConfigOverrideError, match="cannot parse the config override"):
        apply_overrides(cfg, ["train.max_iter"])
    with pytest.raises(ConfigOverrideError, match="write model.teacher=null for None"):
        apply_overrides(cfg, ["model.teacher=None"])
    apply_overrides(cfg, ["model.teacher=null"])
    assert cfg.model.teacher is None
