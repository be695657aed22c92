"""Issue 13, findings 5 (determinism with drop path) and 7 (adversarial data).

Determinism: with drop path 0.1, a pre-training run killed (SIGKILL, inside a checkpoint
write) and resumed ends with weights ``torch.equal`` to the uninterrupted run's, and so
does a Mask R-CNN fine-tuning run (its data order resumes too); 1 vs 2 CPU processes agree
to float rounding (bitwise equality cannot hold there: see docs/reliability.md, "Crash safety and
bad input"). Before the fix, drop path drew from the per-rank global RNG: 1 vs 2 processes
differed by ~2e-3 and a resumed run by ~1e-3.

Data: FIFOs and symlink loops in an image folder, a float32 TIFF, a non-UTF-8 file name,
COCO annotations without ``segmentation``, an EXIF-rotated JPEG whose size disagrees with
the json, a folder with nothing readable, ``skipped_images`` in fine-tuning metrics.
"""
import io
import json
import logging
import os
import threading

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from tests.helpers.train_cli import (
    ROOT,
    env_for,
    error_line,
    kill_group,
    load_model,
    make_image_folder,
    max_abs_diff,
    metrics,
    paused_write,
    run,
    start,
    train_cmd,
    wait_for,
)
from itpn_d2.data.image_folder import load_image_folder
from itpn_d2.data.mim_mapper import MIMDatasetMapper, read_rgb_image
from itpn_d2.data.resumable import NoReadableImagesError, build_resumable_train_loader
from itpn_d2.data.safe_mapper import SafeDatasetMapper
from itpn_d2.modeling.drop_path import DropPath, DropPathStep, set_drop_path_step

pytestmark = pytest.mark.usefixtures("one_thread")

DP = "model.backbone.net.drop_path_rate=0.1"


# --------------------------------------------------------------------------- drop path


def test_drop_path_decisions_are_a_function_of_the_global_sample():
    dp = DropPath(0.5, layer_id=3).train()
    x = torch.ones(8, 5)
    try:
        set_drop_path_step(DropPathStep(seed=7, iteration=11, rank=0))
        torch.manual_seed(0)
        one = dp(x)
        torch.manual_seed(1)  # the global RNG plays no part
        assert torch.equal(dp(x), one)
        assert 0 < int((one[:, 0] == 0).sum()) < 8 and set(one.unique().tolist()) <= {0.0, 2.0}
        # 2 processes x 4 samples: rank r holds global samples 4r .. 4r + 3
        halves = []
        for r in range(2):
            set_drop_path_step(DropPathStep(seed=7, iteration=11, rank=r))
            halves.append(dp(x[:4]))
        assert torch.equal(torch.cat(halves), one)
        # other iteration / layer / branch: other decisions
        set_drop_path_step(DropPathStep(seed=7, iteration=12, rank=0))
        big = torch.ones(64, 1)
        a = dp(big)
        set_drop_path_step(DropPathStep(seed=7, iteration=11, rank=0))
        assert not torch.equal(a, dp(big)) and not torch.equal(dp(big, branch=1), dp(big))
    finally:
        set_drop_path_step(None)
    # without a step key: torch's RNG, as timm's DropPath
    torch.manual_seed(0)
    a = dp(torch.ones(64, 1))
    torch.manual_seed(0)
    assert torch.equal(dp(torch.ones(64, 1)), a)
    torch.manual_seed(1)
    assert not torch.equal(dp(torch.ones(64, 1)), a)
    assert torch.equal(dp.eval()(x), x)


def test_hivit_drop_path_keeps_checkpoint_keys_and_numbers_its_layers():
    from itpn_d2.modeling import HiViT, hivit_arch

    with_dp = HiViT(**hivit_arch("tiny"), drop_path_rate=0.1)
    without = HiViT(**hivit_arch("tiny"), drop_path_rate=0.0)
    assert with_dp.state_dict().keys() == without.state_dict().keys()
    ids = [m.layer_id for m in with_dp.modules() if isinstance(m, DropPath)]
    assert len(ids) == 1 + 1 + 6 and len(set(ids)) == len(ids)


def _pretrain_run(out, datasets, *opts, **kw):
    r = run(train_cmd(out, *opts, **kw), env_for(datasets))
    assert r.returncode == 0, r.stderr[-3000:]
    return load_model(os.path.join(out, "model_final.pth"))


@pytest.mark.slow
def test_pretraining_with_drop_path_resumes_bit_identically(tmp_path):
    datasets = tmp_path / "datasets"
    make_image_folder(datasets, n=8)
    opts = ["train.max_iter=9", "train.checkpointer.period=3", "dataloader.train.total_batch_size=2", DP]
    ref = _pretrain_run(tmp_path / "ref", datasets, *opts)

    out = tmp_path / "killed"
    marker = tmp_path / "paused"
    proc = start(paused_write(train_cmd(out, *opts), "model_0000005", marker), env_for(datasets),
                 tmp_path / "killed.log")
    wait_for(marker.exists, proc, what="the paused write of model_0000005")
    kill_group(proc)
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    resumed = _pretrain_run(out, datasets, *opts, resume=True)
    differ = [k for k in ref if not torch.equal(ref[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ, max {max_abs_diff(ref, resumed)}"

    # the comparison means something: drop path changes the result
    no_dp = _pretrain_run(tmp_path / "no_dp", datasets, *opts[:-1])
    assert max_abs_diff(ref, no_dp) > 1e-5


@pytest.mark.slow
def test_pretraining_with_drop_path_two_processes_train_like_one(tmp_path):
    datasets = tmp_path / "datasets"
    make_image_folder(datasets, n=10)
    opts = ["train.max_iter=4", "train.checkpointer.period=100", "dataloader.train.total_batch_size=4", DP]
    one = _pretrain_run(tmp_path / "one", datasets, *opts)
    two = _pretrain_run(
        tmp_path / "two", datasets, *opts, num_gpus=2, extra_args=["--dist-url", f"file://{tmp_path / 'rdv'}"]
    )
    # Not bitwise: DDP sums per-process gradient partial sums in another order than one
    # process's batch (1.2e-7 here, with or without drop path). Per-rank drop path gave 2e-3.
    diff = max_abs_diff(one, two)
    assert diff < 1e-5, f"2-process weights differ from 1-process ones by {diff}"


# --------------------------------------------------------------------------- image folders


def _png(path, value=128, size=(20, 24)):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _scan_with_timeout(root, timeout=60):
    result = {}

    def target():
        try:
            result["dicts"] = load_image_folder(str(root))
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the scan of the image folder did not finish"
    if "error" in result:
        raise result["error"]
    return result["dicts"]


def test_fifo_and_symlink_loops_are_listed_once(tmp_path, caplog):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _png(root / "a" / "1.png")
    _png(root / "b" / "2.png")
    os.mkfifo(root / "a" / "x.png")  # reading it would block forever
    os.symlink(".", root / "again")  # loop to the root
    os.symlink("..", root / "a" / "up")  # two more loops, through each other
    os.symlink("../a", root / "b" / "to_a")
    os.symlink("missing.png", root / "b" / "dangling.png")
    with caplog.at_level(logging.WARNING, logger="itpn_d2.data.image_folder"):
        dicts = _scan_with_timeout(root)
    names = sorted(os.path.relpath(d["file_name"], root) for d in dicts)
    assert names == ["a/1.png", "b/2.png"]
    assert [d["image_id"] for d in dicts] == [0, 1]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "not a regular file" in warned and "x.png" in warned

    # a symlink to a folder outside the root is still followed (once)
    outside = tmp_path / "outside"
    outside.mkdir()
    _png(outside / "3.png")
    os.symlink(outside, root / "ext")
    os.symlink(outside, root / "ext2")
    names = sorted(os.path.relpath(d["file_name"], root) for d in _scan_with_timeout(root))
    assert names == ["a/1.png", "b/2.png", "ext/3.png"]


def test_float32_tiff_is_scaled_by_its_range(tmp_path, caplog):
    a = np.linspace(0, 1, 32 * 16, dtype=np.float32).reshape(16, 32)
    path = tmp_path / "f.tif"
    Image.fromarray(a, mode="F").save(path)
    assert Image.open(path).mode == "F"
    import itpn_d2.data.mim_mapper as mm

    mm._float_noted = False
    with caplog.at_level(logging.INFO, logger="itpn_d2.data.mim_mapper"):
        im = read_rgb_image(str(path))
    assert im.shape == (16, 32, 3) and im.dtype == np.uint8
    assert im[..., 0].min() == 0 and im[..., 0].max() == 255
    assert np.abs(im[..., 0].astype(np.float64) - a * 255).max() <= 0.5
    assert any("Float image" in r.getMessage() for r in caplog.records)
    # a float image outside [0, 1]: its own min..max
    Image.fromarray(a * 1000 - 500, mode="F").save(path)
    im = read_rgb_image(str(path))
    assert im.min() == 0 and im.max() == 255


def test_warning_for_a_non_utf8_file_name_is_written(tmp_path):
    bad = os.path.join(os.fsencode(str(tmp_path)), b"bad\xff.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    name = os.fsdecode(bad)  # holds a lone surrogate
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    handler = logging.StreamHandler(stream)
    failures = []
    handler.handleError = lambda record: failures.append(record)  # logging's own error path
    log = logging.getLogger("itpn_d2.data.mim_mapper")
    log.addHandler(handler)
    try:
        assert MIMDatasetMapper(image_size=16)({"file_name": name}) is None
    finally:
        log.removeHandler(handler)
    assert not failures, "the skip warning itself failed to be written"
    text = stream.buffer.getvalue().decode("utf-8")
    assert "Skipping unreadable image file" in text and "bad\\udcff.png" in text


# --------------------------------------------------------------------------- COCO fine-tuning


def _smooth(rng, h, w):
    low = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))


def _make_coco(root, *, n_good=4, bad=True):
    """A tiny COCO dataset: ``n_good`` good images; with ``bad``, one annotation without
    ``segmentation``, one EXIF-rotated JPEG with the json's (unrotated) size and one corrupt file."""
    rng = np.random.default_rng(0)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    images, anns = [], []

    def add(fname, w, h, segs=(True,)):
        iid = len(images) + 1
        images.append({"id": iid, "file_name": fname, "width": w, "height": h})
        for k, with_seg in enumerate(segs):
            x, y, bw, bh = 8 + 4 * k, 8, w // 2, h // 2
            a = {"id": len(anns) + 1, "image_id": iid, "category_id": 1, "bbox": [x, y, bw, bh],
                 "area": bw * bh, "iscrowd": 0}
            if with_seg:
                a["segmentation"] = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
            anns.append(a)

    for i in range(n_good):
        Image.fromarray(_smooth(rng, 96, 128)).save(img_dir / f"good{i}.png")
        add(f"good{i}.png", 128, 96)
    if bad:
        Image.fromarray(_smooth(rng, 96, 128)).save(img_dir / "noseg.png")
        add("noseg.png", 128, 96, segs=(True, False))  # detectron2: KeyError 'segmentation'
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on load: the decoded image is 96 x 128
        Image.fromarray(_smooth(rng, 96, 128)).save(img_dir / "rotated.jpg", exif=exif)
        add("rotated.jpg", 128, 96)
        (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        add("corrupt.png", 128, 96)
    ann_file = root / "train.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "thing"}]}))
    return img_dir, ann_file


def _mapper(**kw):
    import detectron2.data.transforms as T

    return SafeDatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(64, 96)], image_format="RGB",
                             use_instance_mask=True, instance_mask_format="bitmask", **kw)


def test_coco_unusable_annotations_and_exif_size_mismatch_are_skipped_and_counted(tmp_path, caplog):
    img_dir, ann_file = _make_coco(tmp_path / "coco")
    name = "adv13_coco_skip"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(ann_file), str(img_dir))
    dicts = DatasetCatalog.get(name)
    by_name = {os.path.basename(d["file_name"]): d for d in dicts}
    mapper = _mapper()
    with caplog.at_level(logging.WARNING, logger="itpn_d2.data.safe_mapper"):
        assert mapper(by_name["noseg.png"]) is None  # was: KeyError 'segmentation'
        assert mapper(by_name["rotated.jpg"]) is None  # was: SizeMismatchError
        good = mapper(by_name["good0.png"])
    assert good["skipped_images"] == 2 and len(good["instances"]) == 1 and mapper.num_skipped == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "noseg.png" in warned and "'segmentation'" in warned
    assert "rotated.jpg" in warned and "SizeMismatchError" in warned

    # through the loader: never seen, every skip counted on a later sample
    loader = build_resumable_train_loader(dicts, mapper=_mapper(), total_batch_size=2, aspect_ratio_grouping=True)
    it = iter(loader)
    seen, skipped = set(), 0
    for _ in range(10):
        for d in next(it):
            seen.add(os.path.basename(d["file_name"]))
            skipped += d["skipped_images"]
    assert seen == {f"good{i}.png" for i in range(4)} and skipped >= 3


def test_nothing_readable_left_is_a_clear_error(tmp_path):
    folder = tmp_path / "allbad"
    folder.mkdir()
    for i in range(3):
        (folder / f"b{i}.png").write_bytes(b"garbage")
    dicts = load_image_folder(str(folder))
    loader = build_resumable_train_loader(dicts, mapper=MIMDatasetMapper(image_size=16), total_batch_size=2)
    with pytest.raises(NoReadableImagesError, match=f"No usable image is left .*3 images under '{folder}'"):
        next(iter(loader))
    # a COCO dataset whose every image is unreadable or unusable (was: ValueError: Sample larger than population)
    img_dir, ann_file = _make_coco(tmp_path / "coco", n_good=0)
    name = "adv13_coco_allbad"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(ann_file), str(img_dir))
    loader = build_resumable_train_loader(DatasetCatalog.get(name), mapper=_mapper(), total_batch_size=2,
                                          aspect_ratio_grouping=True)
    with pytest.raises(NoReadableImagesError, match=str(img_dir)):
        next(iter(loader))


@pytest.mark.slow
def test_nothing_readable_left_through_the_cli_is_one_error_line(tmp_path):
    datasets = tmp_path / "datasets"
    folder = datasets / "imagenet" / "train"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"b{i}.png").write_bytes(b"garbage")
    r = run(train_cmd(tmp_path / "out", "train.max_iter=2", "dataloader.train.total_batch_size=2"), env_for(datasets))
    assert r.returncode == 1, r.stderr[-3000:]
    err = error_line(r.stderr)
    assert err is not None and "No usable image is left" in err and str(folder) in err, r.stderr[-3000:]


# --------------------------------------------------------------------------- fine-tuning via the CLI

_FT_CONFIG = """
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

if "adv13_ft" not in DatasetCatalog.list():
    register_coco_instances("adv13_ft", {{}}, {ann!r}, {img!r})
_cfg = LazyConfig.load({base!r})
model, optimizer, lr_multiplier = _cfg.model, _cfg.optimizer, _cfg.lr_multiplier
train, dataloader = _cfg.train, _cfg.dataloader
dataloader.pop("evaluator")  # training only
dataloader.train.dataset.names = "adv13_ft"
dataloader.train.num_workers = 0
dataloader.train.total_batch_size = 2
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeShortestEdge)(short_edge_length=(64, 96), max_size=128, sample_style="choice"),
]
model.backbone.net.depth = 2
model.backbone.net.drop_path_rate = 0.1
model.roi_heads.num_classes = 1
train.init_checkpoint = ""
train.seed = 0
train.log_period = 1
"""


def _ft_cmd(cfg_file, out, *opts, resume=False):
    import sys

    cmd = [sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"), "--config-file", str(cfg_file)]
    if resume:
        cmd.append("--resume")
    return cmd + [f"train.output_dir={out}", *opts]


@pytest.mark.slow
def test_finetuning_resumes_bit_identically_and_logs_skipped_images(tmp_path):
    img_dir, ann_file = _make_coco(tmp_path / "coco", n_good=5)
    cfg_file = tmp_path / "ft_cfg.py"
    cfg_file.write_text(_FT_CONFIG.format(ann=str(ann_file), img=str(img_dir),
                                          base=os.path.join(ROOT, "configs/COCO/mask_rcnn_itpn_tiny_demo.py")))
    env = env_for(tmp_path)
    opts = ["train.max_iter=6", "train.checkpointer.period=2"]
    r = run(_ft_cmd(cfg_file, tmp_path / "ref", *opts), env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(tmp_path / "ref")
    assert sorted(m) == list(range(6))
    assert all("skipped_images" in m[i] for i in m), m[0]
    assert m[5]["skipped_images_total"] >= 1  # 3 of the 8 entries are unusable

    out = tmp_path / "killed"
    marker = tmp_path / "paused"
    proc = start(paused_write(_ft_cmd(cfg_file, out, *opts), "model_0000003", marker), env_for(tmp_path),
                 tmp_path / "killed.log")
    wait_for(marker.exists, proc, timeout=600, what="the paused write of model_0000003")
    kill_group(proc)
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    r = run(_ft_cmd(cfg_file, out, *opts, resume=True), env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Training data continues at iteration 2" in (out / "log.txt").read_text()
    a, b = load_model(tmp_path / "ref" / "model_final.pth"), load_model(out / "model_final.pth")
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, max {max_abs_diff(a, b)}"
    # the same skips at the same iterations (the resumed process's running total starts afresh)
    resumed = metrics(out)
    assert [resumed[i]["skipped_images"] for i in range(2, 6)] == [m[i]["skipped_images"] for i in range(2, 6)]


def test_step_seed_is_saved_and_restored_with_the_trainer_state():
    from types import SimpleNamespace

    from itpn_d2.engine.determinism import DeterministicStepRNG
    from itpn_d2.modeling.drop_path import get_drop_path_step

    drawn = DeterministicStepRNG(-1)  # train.seed < 0: drawn once, then kept in checkpoints
    drawn.trainer = SimpleNamespace(iter=5, data_loader=[[{"x": 1}]])
    drawn.before_train()
    assert drawn.seed is not None and drawn.state_dict() == {"seed": drawn.seed}
    resumed = DeterministicStepRNG(-1)
    resumed.load_state_dict(drawn.state_dict())
    assert resumed.seed == drawn.seed

    # the step's global draws are a function of (seed, iteration, rank), also after a batch is drawn
    batch = next(iter(drawn.trainer.data_loader))  # the wrapped loader re-seeds after the batch
    assert batch == [{"x": 1}] and get_drop_path_step().iteration == 5
    a = torch.rand(3)
    torch.manual_seed(123)
    drawn.before_step()
    assert torch.equal(torch.rand(3), a)
    drawn.after_step()
    assert get_drop_path_step() is None
