"""Pre-training data: image-folder datasets, the MIM mapper, bad-file handling, the config piece."""
import hashlib
import logging
import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from itpn_d2.data.image_folder import load_image_folder, register_all_unlabeled_folders, register_image_folder
from itpn_d2.data.mim_mapper import MIMDatasetMapper, RandomResizedCrop, read_rgb_image
from tests.helpers import REPO_ROOT

REPO = REPO_ROOT
CONFIG = os.path.join(REPO, "configs/common/data/pretrain_folder.py")
MAPPER_LOGGER = "itpn_d2.data.mim_mapper"
SIZE = 64


def _rand_img(rng, h, w, c=3):
    # smooth-ish content so JPEG keeps it recognisable
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, c), dtype=np.uint8)
    return cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, c)


@pytest.fixture
def image_tree(tmp_path):
    """An ImageNet-like tree with good images of every kind plus four bad files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "n001").mkdir(parents=True)
    (root / "n002" / "deeper").mkdir(parents=True)
    good = []
    for i in range(5):
        p = root / "n001" / f"good{i}.JPEG"
        cv2.imwrite(str(p), _rand_img(rng, 48 + 8 * i, 80 - 6 * i))
        good.append(p)
    for i in range(2):
        p = root / "n002" / f"png{i}.png"
        cv2.imwrite(str(p), _rand_img(rng, 70, 50))
        good.append(p)
    p = root / "n002" / "gray.jpg"
    cv2.imwrite(str(p), _rand_img(rng, 60, 60, 1)[:, :, 0])
    good.append(p)
    p = root / "n002" / "rgba.png"
    Image.fromarray(np.concatenate([_rand_img(rng, 40, 72), np.full((40, 72, 1), 100, np.uint8)], 2), "RGBA").save(p)
    good.append(p)
    p = root / "n002" / "palette.png"
    Image.fromarray(_rand_img(rng, 50, 50)).convert("P", palette=Image.ADAPTIVE, colors=16).save(p)
    good.append(p)
    p = root / "n002" / "deeper" / "gray16.png"
    cv2.imwrite(str(p), (np.arange(56 * 56).reshape(56, 56) * 20).astype(np.uint16))
    good.append(p)
    p = root / "n002" / "deeper" / "rgb16.png"
    cv2.imwrite(str(p), (rng.integers(0, 65536, size=(56, 64, 3))).astype(np.uint16))
    good.append(p)

    bad = []
    p = root / "n001" / "corrupt.jpg"
    p.write_bytes(rng.integers(0, 256, size=3000, dtype=np.uint8).tobytes())
    bad.append(p)
    p = root / "n001" / "truncated.jpg"
    ok, buf = cv2.imencode(".jpg", _rand_img(rng, 128, 128))
    p.write_bytes(buf.tobytes()[: len(buf) // 2])
    bad.append(p)
    p = root / "n002" / "empty.png"
    p.write_bytes(b"")
    bad.append(p)
    p = root / "n002" / "notes.jpg"
    p.write_text("this is a text file renamed to .jpg\n")
    bad.append(p)

    # not listed: wrong extension, hidden file
    (root / "n002" / "readme.txt").write_text("not an image")
    cv2.imwrite(str(root / "n001" / "._hidden.jpg"), _rand_img(rng, 32, 32))
    return root, sorted(map(str, good)), sorted(map(str, bad))


def _hash_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[p] = (hashlib.sha256(fh.read()).hexdigest(), os.path.getmtime(p))
    return out


def _register(root):
    name = f"test_unlabeled_{uuid.uuid4().hex[:8]}"
    register_image_folder(name, str(root))
    return name


# --------------------------------------------------------------------------- dataset


def test_load_image_folder_lists_images_deterministically(image_tree):
    root, good, bad = image_tree
    dicts = load_image_folder(str(root))
    names = [d["file_name"] for d in dicts]
    assert sorted(names) == sorted(good + bad)  # .txt and hidden files excluded, .JPEG included
    assert names == sorted(names, key=lambda n: os.path.relpath(n, root))
    assert [d["image_id"] for d in dicts] == list(range(len(dicts)))
    assert all(set(d) == {"file_name", "image_id"} for d in dicts)
    assert load_image_folder(str(root)) == dicts


def test_register_is_lazy_and_errors_name_the_folder(tmp_path, image_tree):
    missing = tmp_path / "does_not_exist"
    name = _register(missing)  # registering must not touch the disk
    assert MetadataCatalog.get(name).evaluator_type is None
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        DatasetCatalog.get(name)
    empty = tmp_path / "empty_dir"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "a.txt").write_text("x")
    with pytest.raises(RuntimeError, match="empty_dir.*no image files"):
        DatasetCatalog.get(_register(empty))
    root, good, bad = image_tree
    assert len(DatasetCatalog.get(_register(root))) == len(good) + len(bad)


def test_builtin_registration_uses_datasets_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "dsroot"))
    for n in ("imagenet_train_unlabeled", "imagenet_val_unlabeled"):
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
    register_all_unlabeled_folders()
    with pytest.raises(FileNotFoundError, match=r"dsroot.imagenet.train"):
        DatasetCatalog.get("imagenet_train_unlabeled")


# --------------------------------------------------------------------------- decoding


def test_read_rgb_image_converts_every_mode(image_tree):
    root, good, _ = image_tree
    by_name = {os.path.basename(g): g for g in good}
    for g in good:
        a = read_rgb_image(g)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, g
    gray = read_rgb_image(by_name["gray.jpg"])
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    rgba = read_rgb_image(by_name["rgba.png"])
    assert np.array_equal(rgba, np.asarray(Image.open(by_name["rgba.png"]))[..., :3])
    # 16-bit grayscale: scaled over the full range (PIL's convert would clip at 255)
    g16 = cv2.imread(by_name["gray16.png"], cv2.IMREAD_UNCHANGED).astype(np.float64)
    a16 = read_rgb_image(by_name["gray16.png"])
    assert np.array_equal(a16[..., 0], np.round(g16 * 255 / 65535).astype(np.uint8))
    assert a16.max() > 200 and len(np.unique(a16)) > 100
    # 16-bit RGB: cv2 gives BGR uint16
    c16 = cv2.imread(by_name["rgb16.png"], cv2.IMREAD_UNCHANGED)[..., ::-1].astype(np.float64)
    assert np.abs(read_rgb_image(by_name["rgb16.png"]).astype(np.float64) - c16 / 257).max() <= 1.0


def test_truncated_jpeg_is_skipped_not_half_loaded(image_tree, caplog):
    _, _, bad = image_tree
    truncated = [b for b in bad if b.endswith("truncated.jpg")][0]
    mapper = MIMDatasetMapper(image_size=SIZE)
    with caplog.at_level(logging.WARNING, logger=MAPPER_LOGGER):
        assert mapper({"file_name": truncated, "image_id": 0}) is None
        assert mapper({"file_name": truncated, "image_id": 0}) is None
    msgs = [r.getMessage() for r in caplog.records if r.name == MAPPER_LOGGER]
    assert len(msgs) == 1 and truncated in msgs[0] and "truncated" in msgs[0]
    assert mapper.num_skipped == 2


def test_truncated_jpeg_is_skipped_even_if_pil_is_lenient(image_tree, monkeypatch):
    from PIL import ImageFile

    _, _, bad = image_tree
    truncated = [b for b in bad if b.endswith("truncated.jpg")][0]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do globally
    with pytest.raises(OSError, match="truncated"):
        read_rgb_image(truncated)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global setting is restored


def test_mapper_output_and_skip_count(image_tree):
    _, good, bad = image_tree
    mapper = MIMDatasetMapper(image_size=SIZE, color_jitter=0.4)
    for b in bad:
        assert mapper({"file_name": b, "image_id": 1}) is None
    src = {"file_name": good[0], "image_id": 3}
    out = mapper(src)
    assert set(src) == {"file_name", "image_id"}  # input dict untouched
    assert out["image"].shape == (3, SIZE, SIZE) and out["image"].dtype == torch.uint8
    assert out["skipped_images"] == len(bad)
    assert mapper(src)["skipped_images"] == 0
    with pytest.raises(ValueError, match="multiple of the 16"):
        MIMDatasetMapper(image_size=100)


def test_random_resized_crop_geometry():
    np.random.seed(0)
    img = np.zeros((90, 300, 3), np.uint8)
    aug = RandomResizedCrop(32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    for _ in range(50):
        tfm = aug.get_transform(img)
        crop, resize = tfm.transforms
        assert 0 <= crop.x0 and crop.x0 + crop.w <= 300 and 0 <= crop.y0 and crop.y0 + crop.h <= 90
        area = crop.w * crop.h / (90 * 300)
        assert 0.15 <= area <= 1.0
        assert tfm.apply_image(img).shape == (32, 32, 3)
    # fallback (no valid draw on a 1-pixel-high strip): centre crop, ratio clamped
    tfm = aug.get_transform(np.zeros((1, 500, 3), np.uint8))
    assert tfm.apply_image(np.zeros((1, 500, 3), np.uint8)).shape == (32, 32, 3)
    assert tfm.transforms[0].h == 1 and tfm.transforms[0].w == 1


# --------------------------------------------------------------------------- loaders


def _loader_cfg(name, num_workers, batch):
    cfg = LazyConfig.load(CONFIG)
    cfg.dataloader.train.dataset.names = name
    cfg.dataloader.train.mapper.image_size = SIZE
    cfg.dataloader.train.total_batch_size = batch
    cfg.dataloader.train.num_workers = num_workers
    return cfg


def _check_batch(batch, n):
    assert isinstance(batch, list) and len(batch) == n
    for d in batch:
        img = d["image"]
        assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.uint8
        assert img.min() >= 0 and img.max() <= 255 and img.float().std() > 0
        assert isinstance(d["skipped_images"], int)


def test_train_loader_skips_and_counts_bad_files(image_tree, caplog):
    root, good, bad = image_tree
    before = _hash_tree(root)
    cfg = _loader_cfg(_register(root), num_workers=0, batch=4)
    mapper = instantiate(cfg.dataloader.train.mapper)
    events = []  # independent record of what the mapper returned, in order

    def spy(d):
        out = mapper(d)
        events.append((d["file_name"], out is not None))
        return out

    cfg.dataloader.train.mapper = spy
    loader = instantiate(cfg.dataloader.train)
    total_skipped, n_batches = 0, 12  # 48 samples: more than two passes over the 17 files
    with caplog.at_level(logging.WARNING, logger=MAPPER_LOGGER):
        for i, batch in enumerate(loader):
            _check_batch(batch, 4)
            total_skipped += sum(d["skipped_images"] for d in batch)
            if i + 1 == n_batches:
                break
    last_ok = max(i for i, (_, ok) in enumerate(events) if ok)
    failed = [f for f, ok in events[: last_ok + 1] if not ok]
    assert set(f for f, ok in events if not ok) == set(bad)  # every bad file met, no good one failed
    assert total_skipped == len(failed) >= len(bad)
    warned = [r.getMessage() for r in caplog.records if r.name == MAPPER_LOGGER]
    for b in bad:
        assert sum(f"'{b}'" in m for m in warned) == 1, (b, warned)
    assert len(warned) == len(bad)
    assert _hash_tree(root) == before


def test_train_loader_with_workers(image_tree, tmp_path):
    root, good, bad = image_tree
    before = _hash_tree(root)
    log_file = tmp_path / "workers.log"
    handler = logging.FileHandler(log_file)  # forked workers inherit it
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(process)d %(message)s"))
    lg = logging.getLogger(MAPPER_LOGGER)
    lg.addHandler(handler)
    try:
        cfg = _loader_cfg(_register(root), num_workers=2, batch=4)
        total_skipped = 0
        loader = instantiate(cfg.dataloader.train)
        for i, batch in enumerate(loader):
            _check_batch(batch, 4)
            total_skipped += sum(d["skipped_images"] for d in batch)
            if i == 9:
                break
        del loader
    finally:
        lg.removeHandler(handler)
        handler.close()
    assert total_skipped >= 1
    lines = log_file.read_text().splitlines()
    for b in bad:
        pids = [ln.split()[0] for ln in lines if f"'{b}'" in ln]
        assert len(pids) == len(set(pids)) <= 2  # at most once per worker
    assert any(f"'{b}'" in ln for b in bad for ln in lines)
    assert _hash_tree(root) == before


def test_skipped_images_reach_the_metrics(image_tree):
    """Loader -> training steps of a MaskedPretrainer: the skip count lands in the EventStorage,
    logged by the trainer-side hook ``SkippedImagesMetric`` (for every model)."""
    from detectron2.engine import HookBase, SimpleTrainer

    from itpn_d2.engine.skipped_images import SkippedImagesMetric
    from itpn_d2.modeling.backbone import ITPNBackbone
    from itpn_d2.modeling.decoder import PixelDecoder
    from itpn_d2.modeling.hivit import HiViT
    from itpn_d2.modeling.masking import RandomMaskGenerator
    from itpn_d2.modeling.pretrainer import MaskedPretrainer
    from itpn_d2.modeling.pyramid import FeaturePyramid

    torch.manual_seed(0)
    model = MaskedPretrainer(
        backbone=ITPNBackbone(
            net=HiViT(embed_dim=64, mlp_depths=(1, 1), depth=1, num_heads=2, pretrain_img_size=SIZE),
            pyramid=FeaturePyramid(embed_dim=64, out_dim=32, depth=1),
        ),
        mask_generator=RandomMaskGenerator(),
        pixel_decoder=PixelDecoder(in_dim=32, dec_dim=32, depth=1, num_heads=2, pretrain_img_size=SIZE),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).train()
    root, _, bad = image_tree
    counted = []

    class Spy:  # counts what the batches carry, independently of the hook
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for batch in self.loader:
                counted.append(sum(d["skipped_images"] for d in batch))
                yield batch

    class Record(HookBase):
        def after_step(self):
            logged.append(self.trainer.storage.history("skipped_images").latest())

    logged = []
    loader = Spy(instantiate(_loader_cfg(_register(root), num_workers=0, batch=4).dataloader.train))
    trainer = SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.0))
    trainer.register_hooks([SkippedImagesMetric(), Record()])
    trainer.train(0, 6)
    seen = sum(counted)
    assert seen >= 1 and logged == counted and sum(logged) == seen
    assert trainer.storage.history("skipped_images_total").latest() == seen
