"""The README's "Train on your own data" templates (configs/custom/) work as written.

Each template is copied into a copy of ``configs/`` with only its "edit these" block pointed at
generated data in the three layouts users bring (a COCO json, an image folder, image + label-PNG
folders); the test then loads it as the trainer does and draws a real batch, so a template that
registers the wrong thing, names a missing field or mis-sets the classes fails here.
"""
import os
import re
import shutil

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog

from itpn_d2.data.synthetic import CATEGORIES, SyntheticSpec, ensure_synthetic, split_paths, stuff_classes
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("custom") / "synthetic")
    ensure_synthetic(root, SyntheticSpec(num_train=4, num_val=2, num_unlabeled=4, image_size=64, image_format="png"))
    return root


def _edited_template(tmp_path, name: str, values: dict) -> str:
    """Copy configs/ to tmp_path and set the template's edit-block constants to ``values``."""
    configs = tmp_path / "configs"
    shutil.copytree(os.path.join(ROOT, "configs"), configs)
    path = configs / "custom" / name
    text = path.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", text, count=1, flags=re.M)
        assert n == 1, f"{name} has no edit-block line '{key} = ...'"
    path.write_text(text)
    return str(path)


def _forget(*names):
    # the templates register once per process; each test registers its own paths
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _load(path):
    cfg = LazyConfig.load(path)
    # a batch of 2 (the schedules follow it; small data holds no full batch of the recipe's 64)
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    return cfg


def _one_batch(cfg):
    return next(iter(instantiate(cfg.dataloader.train)))


@pytest.mark.parametrize("template,masks", [("mask_rcnn_itpn_base_1x.py", True), ("faster_rcnn_itpn_base_1x.py", False)])
def test_coco_json_templates(tmp_path, data_root, template, masks):
    train, val = split_paths(data_root, "train"), split_paths(data_root, "val")
    out = str(tmp_path / "out")
    path = _edited_template(tmp_path, template, dict(
        TRAIN_JSON=train["json_file"], VAL_JSON=val["json_file"], IMAGE_ROOT=train["image_root"],
        NUM_CLASSES=len(CATEGORIES), NUM_TRAIN_IMAGES=4, OUTPUT_DIR=out,
    ))
    _forget("my_instances_train", "my_instances_val", "my_boxes_train", "my_boxes_val")
    cfg = _load(path)
    LazyConfig.load(path)  # a second load in the same process (tools do it) must not re-register
    assert cfg.train.output_dir == out
    heads = cfg.model.roi_heads
    assert heads.num_classes == heads.box_predictor.num_classes == len(CATEGORIES)
    if masks:
        assert heads.mask_head.num_classes == len(CATEGORIES)
    # 12 epochs of the 4 training images at batch 2
    assert cfg.train.max_iter == 24
    batch = _one_batch(cfg)
    # class names come from the json's categories (set when the batch's dataset was loaded)
    assert MetadataCatalog.get(cfg.dataloader.train.dataset.names).thing_classes == list(CATEGORIES)
    inst = batch[0]["instances"]
    assert len(inst) > 0 and int(inst.gt_classes.max()) < len(CATEGORIES)
    assert inst.has("gt_masks") == masks
    # the evaluator is built for the validation set
    assert cfg.dataloader.evaluator.dataset_name == cfg.dataloader.test.dataset.names


def test_sem_seg_folder_template(tmp_path, data_root):
    # The synthetic labels already are 0 = background, 1..K, 255 = ignore, as the template asks.
    train, val = split_paths(data_root, "train"), split_paths(data_root, "val")
    path = _edited_template(tmp_path, "uper_itpn_base_160k.py", dict(
        IMAGE_DIRS={"train": train["image_root"], "val": val["image_root"]},
        LABEL_DIRS={"train": train["sem_seg_root"], "val": val["sem_seg_root"]},
        IMAGE_EXT="png", CLASS_NAMES=stuff_classes(), OUTPUT_DIR=str(tmp_path / "out"),
    ))
    _forget("my_sem_seg_train", "my_sem_seg_val")
    cfg = _load(path)
    assert cfg.model.sem_seg_head.num_classes == len(stuff_classes())
    batch = _one_batch(cfg)
    sem = batch[0]["sem_seg"]
    values = set(torch.unique(sem).tolist()) - {255}
    assert values and max(values) < len(stuff_classes())
    assert MetadataCatalog.get("my_sem_seg_val").stuff_classes == stuff_classes()
    assert len(DatasetCatalog.get("my_sem_seg_val")) == 2


def test_image_folder_pretrain_template(tmp_path, data_root):
    folder = split_paths(data_root, "unlabeled")["image_root"]
    path = _edited_template(tmp_path, "mim_mfm_itpn_base_800ep.py", dict(
        IMAGE_FOLDER=folder, NUM_IMAGES=4, EPOCHS=8, OUTPUT_DIR=str(tmp_path / "out"),
    ))
    _forget("my_images_unlabeled")
    cfg = _load(path)
    assert cfg.train.max_iter == 16  # 8 epochs of 4 images at batch 2
    assert len(DatasetCatalog.get("my_images_unlabeled")) == 4
    batch = _one_batch(cfg)
    assert len(batch) == 2
