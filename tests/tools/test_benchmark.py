"""``tools/benchmark.py --what finetune``: the demo's fine-tuning steps, timed on their own data."""
import os
import re
import subprocess
import sys

import pytest

from itpn_d2.data.synthetic import SyntheticSpec, ensure_synthetic
from tests.helpers import REPO_ROOT


@pytest.mark.slow
def test_finetune_part_times_the_demo_configs_and_profiles(tmp_path):
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
    stems = ("mask_rcnn_itpn_tiny_demo", "uper_itpn_tiny_demo_frozen", "uper_itpn_tiny_demo")
    assert set(rates) == {f"{s}.py" for s in stems}, r.stdout
    assert all(float(v) > 0 for v in rates.values())
    for stem in stems:
        table = (prof / f"finetune_{stem}.txt").read_text()
        assert "Self CPU" in table and "aten::" in table



class _BreaksAfter:
    """A stand-in for mmpretrain's train step that works ``ok_calls`` times, then raises."""

    ok_calls = 0

    def __init__(self, model, images, device, dtype, optimizer=None):
        from itpn_d2.benchmark.train_step import make_optimizer

        self.model, self.opt, self.calls = model, make_optimizer(model), 0

    def fwd_bwd(self):
        import torch

        self.calls += 1
        if self.calls > self.ok_calls:
            raise RuntimeError("no kernel for this case")
        self.model(torch.ones(1, 2)).sum().backward()

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.fwd_bwd()
        self.opt.step()


def _bench_with_reference(monkeypatch, ok_calls):
    import torch

    from itpn_d2.benchmark import pretraining
    from itpn_d2.benchmark.options import BenchmarkOptions

    stand_in = type("StandIn", (_BreaksAfter,), {"ok_calls": ok_calls})
    monkeypatch.setattr(pretraining, "build_reference", lambda device: (torch.nn.Linear(2, 2), "stand-in", None))
    monkeypatch.setattr(pretraining, "ReferenceStep", stand_in)
    args = BenchmarkOptions(arch="tiny", batch=2, img=64, dtypes="fp32", reference="on", optimizer="plain",
                            quick=True)
    return pretraining.bench_pretrain(args, "cpu", warmup=0, reps=2)


# the reference's calls: 1 the check step, 2 the FLOP count, 3-4 the timed steps, 5+ the memory measurement
@pytest.mark.parametrize("ok_calls, why", [(1, "UNAVAILABLE: its FLOP count failed"),
                                           (2, "UNAVAILABLE: its timed steps failed"),
                                           (4, "peak memory not measured")])
def test_pretrain_bench_keeps_ours_when_the_reference_breaks(monkeypatch, capsys, ok_calls, why):
    """The reference has never run on a GPU: if it breaks after its check step, the stage still
    reports our figures and says why the reference's are missing."""
    results = _bench_with_reference(monkeypatch, ok_calls)
    out = capsys.readouterr().out
    assert f"[pretrain] reference fp32: {why}" in out, out
    assert re.search(r"^\[pretrain\] ours fp32: [\d.]+ img/s", out, re.M), out
    assert re.search(r"^\[pretrain\] ours fp32: peak memory \d+ MiB", out, re.M), out
    if ok_calls < 4:
        assert set(results) == {("ours", "fp32")}
    else:  # timed, only its memory is missing: the ratio stands
        assert "[pretrain] ratio ours/reference fp32 (throughput):" in out


def test_pretrain_bench_does_not_blame_the_reference_for_our_failure(monkeypatch, capsys):
    from itpn_d2.benchmark import pretraining

    class OursBreaks(pretraining.OursStep):
        calls = 0

        def fwd_bwd(self):
            OursBreaks.calls += 1
            if OursBreaks.calls > 1:  # the FLOP count works, the first timed step fails
                raise RuntimeError("ours broke")
            super().fwd_bwd()

    monkeypatch.setattr(pretraining, "OursStep", OursBreaks)
    with pytest.raises(RuntimeError, match="ours broke"):
        _bench_with_reference(monkeypatch, ok_calls=10)
    assert "UNAVAILABLE" not in capsys.readouterr().out
