"""tools/ablate_integral.py's reporting: mean and spread per variant, the AP curve, the plot,
and the exact fine-tuning commands (the runs themselves are the experiment, not a test)."""
import importlib.util
import os

import cv2
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ablate():
    spec = importlib.util.spec_from_file_location("ablate_integral", os.path.join(ROOT, "tools", "ablate_integral.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(variant, seed, box):
    # two evaluations (after 100 and 200 iterations), three logged losses
    return {"variant": variant, "seed": seed, "loss": [(9, 3.0), (19, 2.0), (29, 1.0 + seed)],
            "ap": [(100, box / 2, box / 3), (200, box, box - 1)], "box_AP": box, "mask_AP": box - 1}


def test_table_and_plot(ablate, tmp_path):
    runs = [_run("scratch", 0, 2.0), _run("scratch", 1, 4.0), _run("integral_mim", 0, 10.0), _run("integral_mim", 1, 12.0)]
    table = ablate.summarise(runs, ["scratch", "integral_mim"])
    assert table[0]["box_AP"] == (3.0, pytest.approx(2 ** 0.5)) and table[1]["mask_AP"][0] == 10.0
    assert table[1]["eval_iters"] == [100, 200] and table[1]["box_AP_curve"] == [5.5, 11.0]
    md = ablate.write_table(table, str(tmp_path / "results.md"), None)
    assert "| scratch | 2 | 3.0 ± 1.4 | 2.0 ± 1.4 | 1.5 / 3.0 |" in md
    assert "box AP at iter 100 / 200" in md and (tmp_path / "results.md").read_text().strip() == md
    ablate.plot(runs, ["scratch", "integral_mim"], str(tmp_path / "curves.png"))
    assert cv2.imread(str(tmp_path / "curves.png")) is not None


def test_mim_only_pretraining_command_switches_mfm_off(ablate, tmp_path, monkeypatch):
    from detectron2.config import LazyConfig

    from itpn_d2.engine.overrides import apply_overrides

    seen = []
    monkeypatch.setattr(ablate, "run", lambda cmd, log: seen.append(cmd))
    ablate.pretrain("mim", str(tmp_path / "pt"), 7)
    (cmd,) = seen
    overrides = cmd[cmd.index(ablate.PRETRAIN_CFG) + 1:]
    cfg = apply_overrides(LazyConfig.load(os.path.join(ROOT, ablate.PRETRAIN_CFG)), overrides)
    assert cfg.model.mfm_decoder is None and cfg.model.teacher is None and cfg.train.max_iter == 7


def test_metrics_of_a_finished_run_are_read_back(ablate, tmp_path):
    import json

    out = tmp_path / "ft"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"")  # a finished run is not re-run
    rows = [{"iteration": 9, "total_loss": 2.5},
            {"iteration": 99, "bbox/AP": float("nan")},  # no detections yet: NaN box AP, no segm row
            {"iteration": 300, "bbox/AP": 4.0, "segm/AP": 3.0, "total_loss": 1.5}]
    (out / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = ablate.finetune("scratch", None, "strict", 0, 300, 3, str(out))
    assert r["ap"] == [(100, 0.0, 0.0), (300, 4.0, 3.0)] and (r["box_AP"], r["mask_AP"]) == (4.0, 3.0)
    assert r["loss"] == [(9, 2.5), (300, 1.5)]
