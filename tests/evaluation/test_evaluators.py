"""COCOEvaluator (pure-Python path) and SemSegEvaluator (numpy-2-safe loader) on a small
dataset generated on the fly: perfect predictions score 100, corrupted ones less."""

import json
import os
import uuid

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.structures import Boxes, Instances

from itpn_d2.evaluation import build_sem_seg_evaluator, sem_seg_loading_fn
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
H, W = 96, 128
CLASSES = ["box", "disc", "bar"]


def _make_dataset(root):
    """3 images with 2-3 objects each. Returns (coco json path, image dir, per-image records)
    where a record holds the instance masks/classes and the semantic label map."""
    rng = np.random.RandomState(0)
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "labels", exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    records = []
    for img_id in range(1, 4):
        img = np.full((H, W, 3), 40, np.uint8)
        label = np.full((H, W), 255, np.uint8)  # void background
        label[H // 2 :, :] = 2  # "bar" floor, stuff only
        objs = []
        shapes = [("box", (10 + 5 * img_id, 10), (50, 45)), ("disc", (85, 40 + 5 * img_id), (18, 14))]
        if img_id != 2:
            shapes.append(("box", (60, 60), (80 + img_id, 88)))
        for cls, a, b in shapes:
            m = np.zeros((H, W), np.uint8)
            if cls == "box":
                cv2.rectangle(m, a, b, 1, thickness=-1)
            else:
                cv2.ellipse(m, a, b, 0, 0, 360, 1, thickness=-1)
            img[m > 0] = rng.randint(60, 255, 3)
            label[m > 0] = CLASSES.index(cls)
            objs.append((cls, m.astype(bool)))
        name = f"{img_id}.png"
        cv2.imwrite(str(root / "images" / name), img)
        cv2.imwrite(str(root / "labels" / name), label)
        coco["images"].append({"id": img_id, "file_name": name, "height": H, "width": W})
        for cls, m in objs:
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x, y, w, h = mask_util.toBbox(rle).tolist()
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": img_id,
                    "category_id": CLASSES.index(cls) + 1,
                    "segmentation": rle,
                    "bbox": [x, y, w, h],
                    "area": float(m.sum()),
                    "iscrowd": 0,
                }
            )
        records.append(
            {
                "image_id": img_id,
                "file_name": str(root / "images" / name),
                "sem_seg_file_name": str(root / "labels" / name),
                "objs": objs,
                "label": label,
            }
        )
    json_path = root / "instances.json"
    json_path.write_text(json.dumps(coco))
    return str(json_path), str(root / "images"), records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    json_path, image_root, records = _make_dataset(root)
    tag = uuid.uuid4().hex[:8]
    inst_name, sem_name = f"gen_inst_{tag}", f"gen_sem_{tag}"
    register_coco_instances(inst_name, {}, json_path, image_root)
    # Loading the dicts sets thing_dataset_id_to_contiguous_id, which COCOEvaluator needs to map
    # class ids back (the test loader does this in a real --eval-only run).
    assert len(DatasetCatalog.get(inst_name)) == 3
    DatasetCatalog.register(
        sem_name,
        lambda: [
            {k: r[k] for k in ("file_name", "sem_seg_file_name", "image_id")} | {"height": H, "width": W}
            for r in records
        ],
    )
    MetadataCatalog.get(sem_name).set(stuff_classes=list(CLASSES), ignore_label=255, evaluator_type="sem_seg")
    yield inst_name, sem_name, records, root
    for n in (inst_name, sem_name):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def _instances(objs, shift=0):
    masks = torch.from_numpy(np.stack([m for _, m in objs]))
    if shift:
        masks = torch.roll(masks, shifts=shift, dims=2)
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    inst = Instances((H, W))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.linspace(0.9, 0.8, len(objs))
    # register_coco_instances maps COCO ids 1..3 to contiguous 0..2 in name order of the json.
    inst.pred_classes = torch.tensor([CLASSES.index(c) for c, _ in objs])
    inst.pred_masks = masks
    return inst


def _coco_eval(name, records, out_dir, shift_image=None):
    ev = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, output_dir=str(out_dir), use_fast_impl=False)
    ev.reset()
    for r in records:
        shift = 12 if r["image_id"] == shift_image else 0
        ev.process([{"image_id": r["image_id"]}], [{"instances": _instances(r["objs"], shift)}])
    return ev.evaluate()


def test_coco_evaluator_perfect_and_corrupted(dataset, tmp_path):
    inst_name, _, records, _ = dataset
    perfect = _coco_eval(inst_name, records, tmp_path / "a")
    assert perfect["bbox"]["AP"] == pytest.approx(100.0)
    assert perfect["segm"]["AP"] == pytest.approx(100.0)
    corrupted = _coco_eval(inst_name, records, tmp_path / "b", shift_image=1)
    assert corrupted["bbox"]["AP"] < 95.0
    assert corrupted["segm"]["AP"] < 95.0
    assert os.path.isfile(tmp_path / "b" / "coco_instances_results.json")


def _one_hot(label, num_classes):
    lab = torch.from_numpy(label.astype(np.int64))
    lab[lab == 255] = 0  # anything: void pixels are not scored
    return torch.nn.functional.one_hot(lab, num_classes).permute(2, 0, 1).float()


def test_sem_seg_loading_fn_reads_labels_as_written(dataset):
    _, _, records, _ = dataset
    r = records[0]
    arr = sem_seg_loading_fn(r["sem_seg_file_name"], dtype=int)
    assert arr.dtype == np.dtype(int) and arr.shape == (H, W)
    np.testing.assert_array_equal(arr, r["label"])
    arr[0, 0] = 7  # the evaluator writes into the array it gets
    with pytest.raises(ValueError, match="one channel"):
        sem_seg_loading_fn(r["file_name"], dtype=int)  # the RGB image, not a label map


def test_sem_seg_evaluator_perfect_and_corrupted(dataset, tmp_path):
    _, sem_name, records, _ = dataset

    def run(corrupt):
        ev = build_sem_seg_evaluator(sem_name, output_dir=str(tmp_path), distributed=False)
        ev.reset()
        for i, r in enumerate(records):
            label = r["label"].copy()
            if corrupt and i == 0:
                label[label == 1] = 0  # the disc predicted as box
            ev.process([{"file_name": r["file_name"]}], [{"sem_seg": _one_hot(label, len(CLASSES))}])
        return ev.evaluate()["sem_seg"]

    perfect = run(False)
    assert perfect["mIoU"] == pytest.approx(100.0)
    assert perfect["pACC"] == pytest.approx(100.0)
    bad = run(True)
    assert bad["mIoU"] < 99.0 and bad["IoU-disc"] < 100.0
    assert bad["IoU-bar"] == pytest.approx(100.0)


def test_ade20k_config_evaluator_and_loader_with_tiny_uper(dataset):
    """The test loader and evaluator of configs/common/data/ade20k.py, pointed at the generated
    dataset, evaluate a tiny UPerNet through detectron2's inference_on_dataset."""
    _, sem_name, _, _ = dataset
    data = LazyConfig.load(os.path.join(ROOT, "configs/common/data/ade20k.py")).dataloader
    data.test.dataset.names = sem_name
    data.test.mapper.augmentations[0].short_edge_length = 64
    data.test.num_workers = 0
    evaluator = instantiate(data.evaluator)
    assert evaluator.sem_seg_loading_fn is sem_seg_loading_fn

    cfg = LazyConfig.load(os.path.join(ROOT, "configs/common/models/uper_itpn.py"))
    from itpn_d2.modeling import hivit_arch

    cfg.model.backbone.net.update(hivit_arch("tiny"))
    cfg.model.backbone.pyramid.out_dim = 16
    cfg.model.sem_seg_head.update(channels=16, aux_channels=8, num_classes=len(CLASSES))
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    res = inference_on_dataset(model, instantiate(data.test), evaluator)["sem_seg"]
    assert 0.0 <= res["mIoU"] <= 100.0 and 0.0 <= res["pACC"] <= 100.0


def test_prepare_ade20k_converts_labels(tmp_path):
    from itpn_d2.data.ade20k import SPLITS, convert_split

    root = tmp_path / "ADEChallengeData2016"
    src = np.array([[0, 1, 2], [150, 7, 0]], np.uint8)
    for split in SPLITS:
        os.makedirs(root / "annotations" / split)
        cv2.imwrite(str(root / "annotations" / split / "ADE_x.png"), src)
    for split in SPLITS:  # what datasets/prepare_ade20k_sem_seg.py runs
        assert convert_split(str(root), split, workers=1) == 1
    out = sem_seg_loading_fn(str(root / "annotations_detectron2" / "validation" / "ADE_x.png"), dtype=int)
    np.testing.assert_array_equal(out, [[255, 0, 1], [149, 6, 255]])
    cv2.imwrite(str(root / "annotations" / "training" / "ADE_bad.png"), np.full((2, 2), 200, np.uint8))
    with pytest.raises(ValueError, match="ADE_bad.png"):
        convert_split(str(root), "training", workers=1)
