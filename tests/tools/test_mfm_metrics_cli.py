"""A short pre-training through ``tools/lazyconfig_train_net.py``, as a user runs it:
metrics.json carries the position-only meter ``mfm_posonly_p2/p3/p4`` beside each
``loss_mfm_*`` (and not in ``total_loss``); the backbone-only baseline config trains."""
import os

import pytest

from tests.helpers.train_cli import IMG, ROOT, env_for, make_image_folder, metrics, run, train_cmd

LEVELS = ("p2", "p3", "p4")


@pytest.mark.slow
def test_metrics_json_carries_posonly_meter(tmp_path):
    make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    r = run(train_cmd(out, "train.max_iter=4", "dataloader.train.total_batch_size=4"), env_for(tmp_path / "data"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert sorted(rows) == [0, 1, 2, 3]
    for it, rec in rows.items():
        for n in LEVELS:
            # the MFM weight warms up from 0 at iteration 0 (model.mfm_warmup_iters), the meter with it
            if it == 0:
                assert rec[f"mfm_posonly_{n}"] == 0 == rec[f"loss_mfm_{n}"], rec
            else:
                assert rec[f"mfm_posonly_{n}"] > 0 and rec[f"loss_mfm_{n}"] > 0, (it, rec)
        # total_loss is the sum of the loss terms only: the meter is not in it
        terms = sum(v for k, v in rec.items() if k.startswith("loss_"))
        assert rec["total_loss"] == pytest.approx(terms, rel=1e-3), rec


@pytest.mark.slow
def test_backbone_only_config_trains(tmp_path):
    make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    cfg = os.path.join(ROOT, "configs", "pretrain", "mim_backbone_only_itpn_tiny_cpu.py")
    cmd = train_cmd(out, "train.max_iter=2", "dataloader.train.total_batch_size=4")
    cmd[cmd.index("--config-file") + 1] = cfg
    cmd.remove(f"model.mfm_decoder.pretrain_img_size={IMG}")  # this config has no MFM decoder
    r = run(cmd, env_for(tmp_path / "data"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    # one loss term: detectron2 logs it as total_loss only
    assert sorted(rows) == [0, 1] and all(rec["total_loss"] > 0 for rec in rows.values()), rows
    assert not any(k.startswith(("loss_mfm", "mfm_posonly")) for rec in rows.values() for k in rec)
    assert os.path.isfile(out / "model_final.pth")
