"""Configs ship with the package: ``itpn_d2.model_zoo.get_config`` after a non-editable install."""
import os
import subprocess
import sys

import pytest

from itpn_d2 import model_zoo
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT


def test_get_config_in_the_source_checkout():
    cfg = model_zoo.get_config("COCO/mask_rcnn_itpn_base_1x.py")
    assert cfg.model.backbone._target_ is not None and "train" in cfg
    assert "COCO/mask_rcnn_itpn_tiny_demo.py" in model_zoo.list_configs()
    assert not any(c.startswith("common") for c in model_zoo.list_configs())
    with pytest.raises(FileNotFoundError, match="not a config of itpn_d2"):
        model_zoo.get_config_file("COCO/nope.py")


@pytest.mark.slow
def test_non_editable_install_ships_the_configs(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), ROOT],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (target / "itpn_d2" / "model_zoo" / "configs" / "COCO" / "mask_rcnn_itpn_base_1x.py").is_file()
    code = (
        "import itpn_d2, os; from itpn_d2 import model_zoo\n"
        f"assert itpn_d2.__file__.startswith({str(target)!r}), itpn_d2.__file__\n"
        "cfg = model_zoo.get_config('COCO/mask_rcnn_itpn_base_1x.py')\n"
        "print(model_zoo.get_config_file('COCO/mask_rcnn_itpn_base_1x.py'), cfg.train.max_iter)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(str(target))
