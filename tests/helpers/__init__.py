"""Test support shared by the test packages (not tests themselves).

``models``: tiny models and inputs; ``train_cli``: running ``tools/lazyconfig_train_net.py`` as a
user does (subprocesses, metrics, kills); ``paused_checkpoint_write``: a launcher that stops one
checkpoint write half-way. Fixtures built on them are in ``tests/conftest.py``.
"""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
