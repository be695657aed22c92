"""ObjectLabelEvaluator: each object is right when the commonest label of its pixels is its class."""
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from itpn_d2.evaluation import ObjectLabelEvaluator

H, W = 20, 30
STUFF = ["background", "bar", "disc"]  # the segmenter's outputs, in another order than the categories
THINGS = ["disc", "bar"]


def _register(records, things=THINGS):
    inst, seg = f"objlab_inst_{uuid.uuid4().hex}", f"objlab_seg_{uuid.uuid4().hex}"
    DatasetCatalog.register(inst, lambda: records)
    MetadataCatalog.get(inst).set(thing_classes=list(things))
    DatasetCatalog.register(seg, lambda: [])
    MetadataCatalog.get(seg).set(stuff_classes=list(STUFF))
    return inst, seg


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # as a json file holds it
    return rle


def _scores(label_map):
    return torch.nn.functional.one_hot(torch.as_tensor(label_map), len(STUFF)).permute(2, 0, 1).float()


@pytest.fixture
def two_images():
    disc_a, bar_a, disc_b = _box(2, 8, 2, 10), _box(10, 18, 15, 28), _box(4, 14, 4, 14)
    records = [
        {"file_name": "imgs/a.jpg", "height": H, "width": W, "annotations": [
            # a polygon (the square's corners) and a compressed RLE, as COCO json files have them
            {"segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]], "category_id": 0},
            {"segmentation": _rle(bar_a), "category_id": 1},
        ]},
        {"file_name": "imgs/b.jpg", "height": H, "width": W, "annotations": [
            {"segmentation": _rle(disc_b), "category_id": 0},
            {"segmentation": _rle(np.zeros((H, W), bool)), "category_id": 1},  # empty: not an object
        ]},
    ]
    label_a = np.zeros((H, W), np.int64)
    label_a[disc_a] = STUFF.index("disc")
    label_a[2:8, 2:5] = STUFF.index("bar")  # 3 of the disc's 8 columns called "bar": still a disc
    label_a[10:13, 15:28] = STUFF.index("bar")  # 3 of the bar's 8 rows: mostly background, wrong
    label_b = np.zeros((H, W), np.int64)
    label_b[disc_b] = STUFF.index("disc")
    return records, label_a, label_b


@pytest.mark.parametrize("distributed", [False, True])
def test_counts_objects_by_the_commonest_label_of_their_pixels(two_images, distributed, caplog):
    records, label_a, label_b = two_images
    ev = ObjectLabelEvaluator(*_register(records), distributed=distributed)
    ev.reset()
    ev.process([{"file_name": "imgs/a.jpg"}, {"file_name": "./imgs/b.jpg"}],
               [{"sem_seg": _scores(label_a)}, {"sem_seg": _scores(label_b)}])
    ev.process([{"file_name": "imgs/unknown.jpg"}], [{"sem_seg": _scores(label_b)}])  # no objects: skipped, told
    res = ev.evaluate()["object_labels"]
    assert res["right"] == 2 and res["objects"] == 3
    assert res["all"] == pytest.approx(200 / 3) and res["pct-disc"] == 100 and res["pct-bar"] == 0
    assert "unknown.jpg" in caplog.text
    # the counts start again after reset; one more correct bar makes it half right
    ev.reset()
    label_a[10:18, 15:28] = STUFF.index("bar")
    ev.process([{"file_name": "imgs/a.jpg"}], [{"sem_seg": _scores(label_a)}])
    res = ev.evaluate()["object_labels"]
    assert (res["right"], res["objects"], res["pct-bar"]) == (2, 2, 100)


def test_refuses_what_it_cannot_compare(two_images):
    records, label_a, _ = two_images
    with pytest.raises(ValueError, match=r"\['cone'\]"):
        ObjectLabelEvaluator(*_register(records, things=["disc", "cone"]))
    ev = ObjectLabelEvaluator(*_register(records), distributed=False)
    with pytest.raises(ValueError, match="a.jpg"):  # a prediction not at the annotated size
        ev.process([{"file_name": "imgs/a.jpg"}], [{"sem_seg": _scores(label_a[:, :20])}])


def test_a_category_named_like_a_total_does_not_overwrite_it():
    """Per-category results are ``pct-<name>``: categories called "right" and "all" keep the totals."""
    stuff, things = ["background", "right", "all"], ["all", "right"]
    inst, seg = f"objlab_inst_{uuid.uuid4().hex}", f"objlab_seg_{uuid.uuid4().hex}"
    obj_all, obj_right = _box(2, 8, 2, 10), _box(10, 18, 15, 28)
    records = [{"file_name": "a.jpg", "height": H, "width": W, "annotations": [
        {"segmentation": _rle(obj_all), "category_id": 0}, {"segmentation": _rle(obj_right), "category_id": 1}]}]
    DatasetCatalog.register(inst, lambda: records)
    MetadataCatalog.get(inst).set(thing_classes=things)
    DatasetCatalog.register(seg, lambda: [])
    MetadataCatalog.get(seg).set(stuff_classes=stuff)
    label = np.zeros((H, W), np.int64)
    label[obj_all] = stuff.index("all")  # right; the "right" object is left as background: wrong
    ev = ObjectLabelEvaluator(inst, seg, distributed=False)
    ev.reset()
    ev.process([{"file_name": "a.jpg"}], [{"sem_seg": _scores(label)}])
    res = ev.evaluate()["object_labels"]
    assert (res["right"], res["objects"], res["all"]) == (1, 2, 50)
    assert (res["pct-all"], res["pct-right"]) == (100, 0)
