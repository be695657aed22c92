"""Export paths that stay supported: detectron2's ``TracingAdapter`` + ``torch.jit.trace`` of
the whole Mask R-CNN (inference), and ``torch.export.export`` of the backbone. Built from the
tiny demo config (configs/COCO/mask_rcnn_itpn_tiny_demo.py) on CPU."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.export import TracingAdapter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_detector(repo_root):
    cfg = LazyConfig.load(os.path.join(repo_root, "configs/COCO/mask_rcnn_itpn_tiny_demo.py"))
    cfg.model.backbone.net.drop_path_rate = 0.0
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float()


def test_mask_rcnn_traces_with_tracing_adapter(tiny_detector):
    model = tiny_detector
    inputs = [{"image": _image(128, 160, 0)}]
    adapter = TracingAdapter(model, inputs)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False, strict=False)
        want = adapter(*adapter.flattened_inputs)
        got = traced(*adapter.flattened_inputs)
    assert len(got) == len(want) and len(want) >= 3  # boxes, classes, masks, scores... (flattened Instances)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the traced graph is a function of the image, not a replay of the trace input
    other = _image(128, 160, 1)
    with torch.no_grad():
        want_other = adapter(other)
        got_other = traced(other)
    assert [t.shape for t in got_other] == [t.shape for t in want_other]
    for a, b in zip(got_other, want_other):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_backbone_exports_with_torch_export(tiny_detector):
    backbone = tiny_detector.backbone
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        program = torch.export.export(backbone, (x,))
        want = backbone(x)
        got = program.module()(x)
        other = torch.randn(1, 3, 128, 192)
        got_other, want_other = program.module()(other), backbone(other)
    assert list(got) == list(want) == ["p2", "p3", "p4", "p5", "p6"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(got_other[name], want_other[name], rtol=1e-5, atol=1e-5, msg=name)
