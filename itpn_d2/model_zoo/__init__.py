"""The configs that ship with the package, as ``detectron2.model_zoo`` serves detectron2's own.

``pip install .`` (not only an editable install) puts the repository's ``configs/`` folder
inside the package (``setup.py`` links or copies it to ``itpn_d2/model_zoo/configs`` at build
time, as detectron2's ``setup.py`` does for its model zoo), so::

    from itpn_d2 import model_zoo
    cfg = model_zoo.get_config("COCO/mask_rcnn_itpn_base_1x.py")

works from any folder. In a source checkout without that link, the repository's own
``configs/`` is used.
"""
import os

from detectron2.config import LazyConfig

__all__ = ["get_config_file", "get_config", "list_configs"]

_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _configs_root() -> str:
    for root in (_PACKAGED, _SOURCE):
        if os.path.isdir(os.path.join(root, "common")):
            return root
    raise FileNotFoundError(
        f"itpn_d2's configs are not installed (looked in {_PACKAGED} and {_SOURCE}); reinstall the package"
    )


def get_config_file(config_path: str) -> str:
    """Absolute path of a shipped config, e.g. ``"COCO/mask_rcnn_itpn_base_1x.py"``."""
    root = _configs_root()
    path = os.path.join(root, config_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{config_path} is not a config of itpn_d2 (under {root}); see itpn_d2.model_zoo.list_configs()"
        )
    return path


def get_config(config_path: str):
    """The LazyConfig object of a shipped config (``LazyConfig.load`` of :func:`get_config_file`)."""
    return LazyConfig.load(get_config_file(config_path))


def list_configs():
    """Relative paths of every shipped config except the ``common/`` pieces."""
    root = _configs_root()
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            if f.endswith(".py") and not rel.startswith("common" + os.sep) and f != "__init__.py":
                out.append(rel)
    return sorted(out)
