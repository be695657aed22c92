"""The source checkout the package is imported from.

``configs/``, ``tools/`` and ``datasets/`` are files of the checkout, not of the package: code
that starts a tool as a subprocess or reads a config by its documented relative path
(``configs/COCO/...``) resolves it against :data:`REPO_ROOT`. An editable install (``pip install
-e .``) or ``PYTHONPATH`` pointing at the checkout is assumed, as for every tool.
"""
import os

__all__ = ["REPO_ROOT"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
