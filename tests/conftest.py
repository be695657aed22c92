import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import itpn_d2  # noqa: E402,F401  (fills detectron2's registries)
from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone, hivit_arch  # noqa: E402


def make_tiny_backbone(fpn_depth: int = 2, out_dim: int = 64, **net_kwargs) -> ITPNBackbone:
    arch = hivit_arch("tiny")
    arch.update(net_kwargs.pop("arch", {}))
    net = HiViT(**arch, **net_kwargs)
    pyramid = FeaturePyramid(embed_dim=net.embed_dim, out_dim=out_dim, depth=fpn_depth)
    return ITPNBackbone(net=net, pyramid=pyramid)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread; with more, processes on a shared
    2-core machine (and DataLoader workers) only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_backbone():
    torch.manual_seed(0)
    return make_tiny_backbone().eval()


@pytest.fixture(scope="session")
def repo_root():
    return ROOT
