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


def test_pretrain_bench_keeps_ours_when_the_reference_fails_in_its_timed_steps(monkeypatch, capsys):
    """The reference has never run on a GPU: if it breaks after its check step (in the FLOP count
    or the timed steps), the stage still reports our figures and says why the reference is gone."""
    import torch

    from itpn_d2.benchmark import pretraining
    from itpn_d2.benchmark.options import BenchmarkOptions
    from itpn_d2.benchmark.train_step import TrainStep, make_optimizer

    class BreaksAfterTwoSteps(TrainStep):  # stands in for mmpretrain's step
        def __init__(self, model, images, device, dtype, optimizer=None):
            self.model, self.opt, self.calls = model, make_optimizer(model), 0

        def loss(self):
            self.calls += 1  # 1: the check step, 2: the FLOP count, 3: the first timed step
            if self.calls > 2:
                raise RuntimeError("no kernel for this case")
            return self.model(torch.ones(1, 2)).sum()

    ref = torch.nn.Linear(2, 2)
    monkeypatch.setattr(pretraining, "build_reference", lambda device: (ref, "stand-in", None))
    monkeypatch.setattr(pretraining, "ReferenceStep", BreaksAfterTwoSteps)
    args = BenchmarkOptions(arch="tiny", batch=2, img=64, dtypes="fp32", reference="on", optimizer="plain",
                            quick=True, no_memory=True)
    results = pretraining.bench_pretrain(args, "cpu", warmup=0, reps=2)
    out = capsys.readouterr().out
    assert "[pretrain] reference fp32: UNAVAILABLE: its timed steps failed (RuntimeError: no kernel" in out, out
    assert set(results) == {("ours", "fp32")}
    assert re.search(r"^\[pretrain\] ours fp32: [\d.]+ img/s", out, re.M), out
