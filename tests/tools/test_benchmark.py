"""``tools/benchmark.py --what finetune``: the demo's fine-tuning steps, timed on their own data."""
import os
import re
import subprocess
import sys

import pytest

from itpn_d2.data.synthetic import SyntheticSpec, ensure_synthetic
from tests.helpers import REPO_ROOT


@pytest.mark.slow
def test_finetune_part_times_both_demo_configs_and_profiles(tmp_path):
    # Small generated data where the built-in datasets look for it: registration adopts its manifest.
    root = tmp_path / "synthetic"
    ensure_synthetic(str(root), SyntheticSpec(num_train=8, num_val=2, num_unlabeled=0, image_size=64, image_format="png"))
    env = dict(os.environ, ITPN_SYNTHETIC_ROOT=str(root), OMP_NUM_THREADS="1")
    prof = tmp_path / "prof"
    r = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "benchmark.py"), "--what", "finetune", "--threads", "1",
         "--warmup", "1", "--reps", "2", "--profile", str(prof), "--device", "cpu",
         "--opts", "dataloader.train.num_workers=0", "dataloader.train.total_batch_size=2"],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rates = dict(re.findall(r"\[finetune\] (\S+\.py): ([0-9.]+) img/s", r.stdout))
    assert set(rates) == {"mask_rcnn_itpn_tiny_demo.py", "uper_itpn_tiny_demo.py"}, r.stdout
    assert all(float(v) > 0 for v in rates.values())
    for stem in ("mask_rcnn_itpn_tiny_demo", "uper_itpn_tiny_demo"):
        table = (prof / f"finetune_{stem}.txt").read_text()
        assert "Self CPU" in table and "aten::" in table
