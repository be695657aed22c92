"""ROIPoolerFP32Boxes: the boxes stay fp32 under autocast; otherwise detectron2's pooler."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from itpn_d2.modeling import ROIAlignFP32Boxes, ROIPoolerFP32Boxes, hivit_arch
from tests.helpers import REPO_ROOT

# boxes of a 1024-px image: bf16 would round 601.3 to 600 and 1010.2 to 1012
BOXES = torch.tensor([[601.3, 517.7, 903.9, 1010.2], [10.3, 20.7, 50.1, 80.9]])
POOLER = dict(output_size=7, scales=(1.0 / 4, 1.0 / 8), sampling_ratio=0, pooler_type="ROIAlignV2")


def _features():
    torch.manual_seed(0)
    return [torch.randn(1, 8, 256, 256), torch.randn(1, 8, 128, 128)]


def _pool(pooler_cls, autocast):
    feats, boxes = _features(), [Boxes(BOXES)]
    pooler = pooler_cls(**POOLER)
    if not autocast:
        return pooler(feats, boxes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return pooler([f.to(torch.bfloat16) for f in feats], boxes)


def test_bf16_autocast_pools_at_the_true_box_coordinates():
    exact = _pool(ROIPooler, autocast=False)
    ours = _pool(ROIPoolerFP32Boxes, autocast=True)
    stock = _pool(ROIPooler, autocast=True)
    assert ours.dtype == torch.bfloat16  # what autocast gives the heads, as before
    err_ours = (ours.float() - exact).abs().max().item()
    err_stock = (stock.float() - exact).abs().max().item()
    # ours differs from fp32 only by the bf16 features (~1e-2); detectron2's also samples other places
    assert err_ours < 0.02, err_ours
    assert err_stock > 2 * err_ours, (err_stock, err_ours)


def test_without_autocast_it_is_detectron2s_pooler():
    assert torch.equal(_pool(ROIPoolerFP32Boxes, autocast=False), _pool(ROIPooler, autocast=False))
    pooler = ROIPoolerFP32Boxes(**POOLER)
    assert all(type(p) is ROIAlignFP32Boxes and p.aligned for p in pooler.level_poolers)
    assert not list(pooler.parameters()) and not pooler.state_dict()
    legacy = ROIPoolerFP32Boxes(**{**POOLER, "pooler_type": "ROIAlign"})
    assert all(type(p) is ROIAlignFP32Boxes and not p.aligned for p in legacy.level_poolers)


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(REPO_ROOT, "configs", "COCO"))
                                         if f.endswith(".py") and f != "mask_rcnn_itpn_tiny_ablation.py"))
def test_detection_configs_use_it(name):
    """Every COCO config, the fp32 demo included (the GPU check trains the demo under bf16), but the
    integral ablation's frozen fp32 recipe (tests/tools/test_ablation.py)."""
    cfg = LazyConfig.load(os.path.join(REPO_ROOT, "configs", "COCO", name + ".py"))
    cfg.model.backbone.net.update(hivit_arch("tiny"))
    model = instantiate(cfg.model)
    poolers = [model.roi_heads.box_pooler, getattr(model.roi_heads, "mask_pooler", None)]
    poolers = [p for p in poolers if p is not None]  # Faster R-CNN has no mask pooler
    for pooler in poolers:
        assert type(pooler) is ROIPoolerFP32Boxes
        assert not any(type(p) is ROIAlign for p in pooler.level_poolers)


def test_scripts_as_detectron2s_pooler_and_leaves_fp64_alone():
    feats, boxes = _features(), [Boxes(BOXES)]
    scripted = torch.jit.script(ROIPoolerFP32Boxes(**POOLER))
    assert torch.equal(scripted(feats, boxes), ROIPooler(**POOLER)(feats, boxes))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves fp64 alone: so do the boxes
        out = ROIPoolerFP32Boxes(**POOLER)([f.double() for f in feats], boxes)
    assert out.dtype == torch.float64
