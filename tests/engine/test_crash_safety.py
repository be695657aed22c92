"""Crash safety of ``tools/lazyconfig_train_net.py`` runs (real subprocesses, real SIGKILL).

* A run SIGKILLed in the middle of training, resumed with ``--resume``, ends with the
  same weights as an uninterrupted run (fixed seed, CPU): the checkpoint restores model,
  optimizer, scheduler and EMA teacher; the data stream continues at the resumed iteration.
* A run SIGKILLed while a checkpoint is being written (the write is paused half-way by a
  test-only hook, so the kill lands inside it deterministically) leaves the previous
  checkpoint and a ``last_checkpoint`` naming it, never a half-written ``model_*.pth``;
  it resumes from there to the same final weights.
* A non-finite loss stops the run with a message naming the iteration and the term, and
  the checkpoints and ``last_checkpoint`` of the run are unchanged (metrics only appended).
"""
import os
import shutil

import pytest
import torch

from tests.helpers.train_cli import (
    checkpoint_state,
    env_for,
    error_line,
    kill_group,
    last_iteration,
    load_model,
    make_image_folder,
    max_abs_diff,
    metrics,
    paused_write,
    run,
    start,
    train_cmd,
    wait_for,
)
from itpn_d2.checkpoint import ITPNCheckpointer, atomic_write

MAX_ITER = 12
PERIOD = 3  # checkpoints after iterations 2, 5, 8, 11 (+ model_final)
OPTS = [f"train.max_iter={MAX_ITER}", f"train.checkpointer.period={PERIOD}", "dataloader.train.total_batch_size=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (datasets root, its output dir)."""
    tmp = tmp_path_factory.mktemp("crash")
    datasets = tmp / "datasets"
    make_image_folder(datasets, n=8)
    out = tmp / "reference"
    r = run(train_cmd(out, *OPTS), env_for(datasets))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(metrics(out)) == list(range(MAX_ITER))
    return datasets, out


def _same_run(reference_out, resumed_out):
    a = load_model(os.path.join(reference_out, "model_final.pth"))
    b = load_model(os.path.join(resumed_out, "model_final.pth"))
    diff = max_abs_diff(a, b)
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run by {diff}"
    # (metrics.json holds 20-iteration medians, which restart with the resumed process: the
    # weights, teacher and optimizer-driven ones alike, are the exact comparison)
    assert sorted(metrics(resumed_out)) == list(range(MAX_ITER))


@pytest.mark.slow
def test_sigkill_mid_training_then_resume(reference, tmp_path):
    datasets, ref_out = reference
    out = tmp_path / "killed"
    proc = start(train_cmd(out, *OPTS), env_for(datasets), tmp_path / "killed.log")
    # past the first checkpoint, well before the end
    wait_for(lambda: last_iteration(out) >= 4, proc, what="iteration 4")
    kill_group(proc)
    assert proc.returncode == -9
    done = last_iteration(out)
    assert done < MAX_ITER - 1, "killed too late to test anything"
    last = (out / "last_checkpoint").read_text()
    assert last.startswith("model_") and (out / last).is_file()
    torch.load(out / last, map_location="cpu", weights_only=True)  # complete and readable

    r = run(train_cmd(out, *OPTS, resume=True), env_for(datasets))
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "log.txt").read_text()
    resumed_at = int(last[len("model_") : -len(".pth")]) + 1
    assert f"Training data continues at iteration {resumed_at}" in log
    _same_run(ref_out, out)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume(reference, tmp_path):
    datasets, ref_out = reference
    out = tmp_path / "killed_in_write"
    marker = tmp_path / "paused"
    proc = start(paused_write(train_cmd(out, *OPTS), "model_0000005", marker), env_for(datasets),
                 tmp_path / "write.log")
    wait_for(marker.exists, proc, what="the paused write of model_0000005")
    kill_group(proc)

    names = sorted(os.listdir(out))
    partial = [n for n in names if n.startswith(".model_0000005.pth.") and n.endswith(".tmp")]
    assert partial, names  # the half-written temporary file is there ...
    assert "model_0000005.pth" not in names  # ... but never under the checkpoint's name
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    ok = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=True)
    assert ok["iteration"] == 2
    with pytest.raises(Exception):
        torch.load(out / partial[0], map_location="cpu", weights_only=True)

    r = run(train_cmd(out, *OPTS, resume=True), env_for(datasets))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Training data continues at iteration 3" in (out / "log.txt").read_text()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], "the stale temporary file is cleaned up"
    _same_run(ref_out, out)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_checkpoints(reference, tmp_path):
    datasets, ref_out = reference
    out = tmp_path / "nan"
    shutil.copytree(ref_out, out)
    before = checkpoint_state(out)
    metrics_before = (out / "metrics.json").read_text()
    # Continue the finished run for 3 more iterations with a NaN weight on the pixel loss:
    # iteration 12 is the first with a NaN term.
    opts = [o for o in OPTS if not o.startswith("train.max_iter")] + [
        f"train.max_iter={MAX_ITER + 3}", "model.mim_weights=nan"
    ]
    r = run(train_cmd(out, *opts, resume=True), env_for(datasets))
    assert r.returncode == 1
    err = error_line(r.stderr)
    assert err is not None, r.stderr[-3000:]
    assert "loss term 'loss_mim' is nan at iteration 12" in err
    assert "model_final.pth" in err  # names the last complete checkpoint
    assert checkpoint_state(out) == before, "no checkpoint may be written or changed after the failure"
    assert (out / "metrics.json").read_text().startswith(metrics_before), "logged metrics are only appended to"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(target), boom)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"], "the temporary file is removed"
    atomic_write(str(target), lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"


def test_checkpointer_writes_last_checkpoint_after_the_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    ck = ITPNCheckpointer(model, str(tmp_path))
    ck.save("model_0000000")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"

    def fail(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="no space"):
        ck.save("model_0000001")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
