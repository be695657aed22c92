"""Fixtures shared by every test package; helper functions are in ``tests/helpers``.

``pytest -m "not slow"`` leaves out the tests marked ``slow``: those that run the tools as
subprocesses (training runs, kills, several processes), for a fast loop; CI runs everything.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import itpn_d2  # noqa: E402,F401  (fills detectron2's registries)
from tests.helpers.models import make_tiny_backbone  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: runs tools/ as subprocesses end to end (deselect with -m 'not slow')"
    )


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
