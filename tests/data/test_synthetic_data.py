"""The built-in generated dataset: determinism, valid annotations, caching, detectron2 registration."""
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.structures import BitMasks

from itpn_d2.data.builtin import ensure_registered_synthetic, register_synthetic, synthetic_dataset_names
from itpn_d2.data.synthetic import CATEGORIES, SEM_SEG_IGNORE, SyntheticSpec, ensure_synthetic, split_paths

TINY = dict(num_train=6, num_val=2, num_unlabeled=3, image_size=64, min_objects=2, max_objects=4, seed=0)
K = len(CATEGORIES)


def _read_rgb(path):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    assert img is not None, path
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth") / "itpn_synthetic")
    ensure_synthetic(root, **TINY)
    return root


def test_same_seed_is_byte_identical_other_seed_differs(tiny_root, tmp_path):
    other = str(tmp_path / "same")
    ensure_synthetic(other, **TINY)
    for split in ("train", "val"):
        a, b = split_paths(tiny_root, split), split_paths(other, split)
        with open(a["json_file"], "rb") as fa, open(b["json_file"], "rb") as fb:
            assert fa.read() == fb.read()
        names = sorted(os.listdir(a["image_root"]))
        assert names == sorted(os.listdir(b["image_root"])) and len(names) == TINY[f"num_{split}"]
        for n in names:
            np.testing.assert_array_equal(_read_rgb(os.path.join(a["image_root"], n)), _read_rgb(os.path.join(b["image_root"], n)))
            s = n.rsplit(".", 1)[0] + ".png"
            np.testing.assert_array_equal(
                cv2.imread(os.path.join(a["sem_seg_root"], s), cv2.IMREAD_UNCHANGED),
                cv2.imread(os.path.join(b["sem_seg_root"], s), cv2.IMREAD_UNCHANGED),
            )

    different = str(tmp_path / "seed1")
    ensure_synthetic(different, **dict(TINY, seed=1))
    a, c = split_paths(tiny_root, "train"), split_paths(different, "train")
    with open(a["json_file"], "rb") as fa, open(c["json_file"], "rb") as fc:
        assert fa.read() != fc.read()
    n = sorted(os.listdir(a["image_root"]))[0]
    assert not np.array_equal(_read_rgb(os.path.join(a["image_root"], n)), _read_rgb(os.path.join(c["image_root"], n)))
    # unlabelled images come from their own seed stream, not copies of the train images
    u = split_paths(tiny_root, "unlabeled")["image_root"]
    assert not np.array_equal(_read_rgb(os.path.join(u, n)), _read_rgb(os.path.join(a["image_root"], n)))


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_are_valid_coco(tiny_root, split):
    spec = SyntheticSpec(**TINY)
    paths = split_paths(tiny_root, split)
    coco = COCO(paths["json_file"])
    assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == list(range(1, K + 1))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert len(coco.getImgIds()) == TINY[f"num_{split}"]
    seen = set()
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        h, w = info["height"], info["width"]
        assert (h, w) == (64, 64)
        assert _read_rgb(os.path.join(paths["image_root"], info["file_name"])).shape == (h, w, 3)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert len(anns) >= 1
        for ann in anns:
            assert ann["iscrowd"] == 0
            mask = coco.annToMask(ann).astype(bool)
            assert mask.shape == (h, w)
            assert ann["area"] == mask.sum() >= spec.visible_area_threshold
            ys, xs = np.nonzero(mask)
            x, y, bw, bh = ann["bbox"]
            assert [x, y, bw, bh] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
            seen.add(ann["category_id"])
    if split == "train":  # num_train >= K: the first object's category cycles over the split
        assert seen == set(range(1, K + 1))


@pytest.mark.parametrize("split", ["train", "val"])
def test_sem_seg_labels_match_visible_instance_masks(tiny_root, split):
    paths = split_paths(tiny_root, split)
    coco = COCO(paths["json_file"])
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        label = cv2.imread(os.path.join(paths["sem_seg_root"], info["file_name"].rsplit(".", 1)[0] + ".png"), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.shape == (info["height"], info["width"])
        assert set(np.unique(label)) <= set(range(K + 1)) | {SEM_SEG_IGNORE}
        covered = np.zeros(label.shape, dtype=np.int32)
        expected = np.zeros_like(label)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            mask = coco.annToMask(ann).astype(bool)
            assert (label[mask] == ann["category_id"]).all()
            covered += mask
            expected[mask] = ann["category_id"]
        assert covered.max() <= 1, "visible masks of one image must not overlap"
        # every non-background, non-ignore label pixel belongs to an annotated instance
        rest = covered == 0
        assert set(np.unique(label[rest])) <= {0, SEM_SEG_IGNORE}
        assert (label[rest] == 0).mean() > 0.95  # 255 only marks rare unannotated slivers
        np.testing.assert_array_equal(label[~rest], expected[~rest])


def test_occlusion_keeps_only_the_visible_part():
    from itpn_d2.data.synthetic import image_rng, render_image

    spec = SyntheticSpec(**dict(TINY, image_size=128, min_objects=6, max_objects=6))
    occluded = 0
    for i in range(10):
        image, instances, sem_seg = render_image(spec, image_rng(spec.seed, "train", i))
        assert len(instances) >= 1
        for k, inst in enumerate(instances):
            vis, full = inst["mask"], inst["full_mask"]
            assert not (vis & ~full).any()
            hidden = full & ~vis
            if hidden.any():
                occluded += 1
                # hidden pixels are the visible pixels of objects drawn later, never of earlier ones
                later_all = np.zeros_like(vis)
                for other in instances[k + 1 :]:
                    later_all |= other["full_mask"]
                assert not (hidden & ~later_all).any()
                assert vis.sum() >= 0.35 * full.sum()
            assert (sem_seg[vis] == inst["category_id"]).all()
    assert occluded > 0


def test_cache_reuse_and_regeneration(tmp_path):
    root = str(tmp_path / "cache")
    first = ensure_synthetic(root, **TINY)
    assert not first["reused"]
    before = _all_files(root)
    second = ensure_synthetic(root, **TINY)
    assert second["reused"]
    assert _all_files(root) == before

    # a missing file makes the cache invalid
    victim = os.path.join(split_paths(root, "val")["image_root"], "000001.jpg")
    os.remove(victim)
    third = ensure_synthetic(root, **TINY)
    assert not third["reused"] and os.path.isfile(victim)

    # another argument regenerates, and the manifest records it
    fourth = ensure_synthetic(root, **dict(TINY, num_val=3))
    assert not fourth["reused"]
    with open(os.path.join(root, "manifest.json")) as f:
        assert json.load(f)["spec"]["num_val"] == 3
    assert len(os.listdir(split_paths(root, "val")["image_root"])) == 3
    # no temporary folders left beside the root
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock")) == ["cache"]


def test_refuses_to_replace_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="manifest"):
        ensure_synthetic(str(root), **TINY)
    assert (root / "precious.txt").read_text() == "keep"


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticSpec(min_objects=4, max_objects=2)
    with pytest.raises(ValueError, match="image_format"):
        SyntheticSpec(image_format="bmp")
    with pytest.raises(TypeError):
        SyntheticSpec(num_images=3)


def test_registration_is_lazy_and_complete(tmp_path):
    root = str(tmp_path / "reg")
    prefix = "itpn_synthetic_unittest"
    names = register_synthetic(root, prefix=prefix, **TINY)
    assert names == synthetic_dataset_names(prefix)
    assert set(names.values()) <= set(DatasetCatalog.list())
    # metadata is there before anything is generated
    assert not os.path.exists(root)
    meta = MetadataCatalog.get(names["train"])
    assert meta.thing_classes == list(CATEGORIES) and meta.evaluator_type == "coco"
    seg_meta = MetadataCatalog.get(names["sem_seg_val"])
    assert seg_meta.stuff_classes == ["background", *CATEGORIES]
    assert seg_meta.evaluator_type == "sem_seg" and seg_meta.ignore_label == 255

    dicts = DatasetCatalog.get(names["train"])
    assert os.path.isfile(os.path.join(root, "manifest.json"))
    assert len(dicts) == TINY["num_train"]
    assert all(len(d["annotations"]) >= 1 for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} == set(range(K))  # contiguous ids
    assert os.path.isfile(MetadataCatalog.get(names["val"]).json_file)

    seg = DatasetCatalog.get(names["sem_seg_train"])
    assert len(seg) == TINY["num_train"] and all(os.path.isfile(d["sem_seg_file_name"]) for d in seg)
    unl = DatasetCatalog.get(names["unlabeled"])
    assert len(unl) == TINY["num_unlabeled"] and all(os.path.isfile(d["file_name"]) and "annotations" not in d for d in unl)
    assert ensure_registered_synthetic(names["val"])["reused"]

    # same arguments: a no-op; other arguments: the registration is replaced
    register_synthetic(root, prefix=prefix, **TINY)
    register_synthetic(root, prefix=prefix, **dict(TINY, num_val=3))
    assert len(DatasetCatalog.get(names["val"])) == 3
    DatasetCatalog.register("itpn_synthetic_foreign_train", lambda: [])
    with pytest.raises(ValueError, match="already registered"):
        register_synthetic(root, prefix="itpn_synthetic_foreign", **TINY)


def test_default_names_registered_on_import():
    names = synthetic_dataset_names()
    assert names["train"] == "itpn_synthetic_train"
    for name in names.values():
        assert name in DatasetCatalog.list()
    assert MetadataCatalog.get("itpn_synthetic_val").thing_classes == list(CATEGORIES)


def test_detectron2_train_loader_yields_instances_with_masks(tmp_path):
    root = str(tmp_path / "loader")
    names = register_synthetic(root, prefix="itpn_synthetic_loadertest", **TINY)
    dataset = DatasetCatalog.get(names["train"])
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True, instance_mask_format="bitmask")
    loader = build_detection_train_loader(dataset, mapper=mapper, total_batch_size=2, num_workers=0, aspect_ratio_grouping=False)
    batch = next(iter(loader))
    assert len(batch) == 2
    by_id = {d["image_id"]: d for d in dataset}
    for item in batch:
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
        inst = item["instances"]
        assert len(inst) == len(by_id[item["image_id"]]["annotations"]) >= 1
        assert isinstance(inst.gt_masks, BitMasks) and inst.gt_masks.tensor.shape == (len(inst), 64, 64)
        want = np.stack([mask_util.decode(a["segmentation"]) for a in by_id[item["image_id"]]["annotations"]]).astype(bool)
        np.testing.assert_array_equal(inst.gt_masks.tensor.numpy(), want)
        assert torch.equal(inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor)

    seg_mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    seg_loader = build_detection_train_loader(
        DatasetCatalog.get(names["sem_seg_train"]), mapper=seg_mapper, total_batch_size=2, num_workers=0, aspect_ratio_grouping=False
    )
    seg_batch = next(iter(seg_loader))
    assert seg_batch[0]["sem_seg"].shape == (64, 64) and int(seg_batch[0]["sem_seg"].max()) <= K


def test_coco_evaluator_scores_ground_truth_as_perfect(tmp_path):
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances

    names = register_synthetic(str(tmp_path / "ev"), prefix="itpn_synthetic_evaltest", **TINY)
    dataset = DatasetCatalog.get(names["val"])

    def evaluate(class_shift):
        evaluator = COCOEvaluator(names["val"], output_dir=None)
        evaluator.reset()
        for d in dataset:
            anns = d["annotations"]
            inst = Instances((64, 64))
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            inst.scores = torch.ones(len(anns))
            inst.pred_classes = torch.tensor([(a["category_id"] + class_shift) % K for a in anns])
            inst.pred_masks = torch.from_numpy(np.stack([mask_util.decode(a["segmentation"]) for a in anns]).astype(bool))
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
        return evaluator.evaluate()

    perfect = evaluate(0)
    assert perfect["bbox"]["AP"] == pytest.approx(100.0) and perfect["segm"]["AP"] == pytest.approx(100.0)
    wrong = evaluate(1)
    assert wrong["segm"]["AP"] < 50.0
