"""A shortened `make demo`: every stage of tools/run_main_job.py for a few iterations."""
import glob
import json
import os
import subprocess
import sys

import cv2
import pytest
import torch

from itpn_d2.checkpoint.safe_load import load_checkpoint_file
from itpn_d2.data.synthetic import CATEGORIES


@pytest.mark.slow
def test_main_job_quick(tmp_path, repo_root):
    out, data = tmp_path / "demo", tmp_path / "data"
    r = subprocess.run(
        [sys.executable, "tools/run_main_job.py", "--quick", "--output-dir", str(out), "--data-root", str(data),
         "--num-demo-images", "2"],
        cwd=repo_root, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # each stage is printed as a plain command a user can re-run
    assert "tools/lazyconfig_train_net.py --config-file configs/pretrain/mim_mfm_itpn_tiny_demo.py" in r.stdout
    assert "--config-file configs/COCO/mask_rcnn_itpn_tiny_demo.py" in r.stdout
    # several fine-tuning processes rendezvous on a free port, not detectron2's fixed per-user one
    assert "--num-gpus 1 " in r.stdout or "--dist-url auto" in r.stdout
    assert "--config-file configs/ADE20K/uper_itpn_tiny_demo_frozen.py" in r.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert os.path.isfile(summary["pretrain_checkpoint"]) and os.path.isfile(summary["finetune_checkpoint"])
    # COCOEvaluator ran and returned numbers (a few iterations: any value, but a number)
    assert isinstance(summary["box_AP"], float) and isinstance(summary["mask_AP"], float)
    assert isinstance(summary["mIoU"], float) and 0.0 <= summary["mIoU"] <= 100.0  # SemSegEvaluator ran
    objects = summary["object_labels"]  # ObjectLabelEvaluator ran beside it, on every validation object
    assert objects["objects"] > 0 and 0 <= objects["right"] <= objects["objects"] and 0.0 <= objects["all"] <= 100.0
    assert {k for k in objects if k.startswith("pct-")} <= {f"pct-{c}" for c in CATEGORIES} and len(objects) > 3
    assert 0 < summary["reconstruction_error_ratio"] < float("inf")  # the reconstruction meter ran
    assert set(summary["stage_seconds"]) >= {"pretrain", "detection", "segmentation"}

    # the fine-tuning log says the whole pre-trained backbone (encoder AND pyramid) was loaded
    ft_log = (out / "finetune.log").read_text()
    assert "pyramid tensors" in ft_log and " 0 backbone tensors re-initialised" in ft_log, ft_log[-2000:]
    # UPerNet loads the detector's encoder and pyramid (no table new by design here), and trains its
    # head on them frozen: its checkpoint holds them unchanged
    seg_log = (out / "segmentation.log").read_text()
    assert f"Loaded {summary['finetune_checkpoint']}: " in seg_log, seg_log[-2000:]
    assert "pyramid tensors" in seg_log and " 0 backbone tensors re-initialised" in seg_log, seg_log[-2000:]
    assert os.path.isfile(summary["segmentation_checkpoint"])
    det, seg = (load_checkpoint_file(summary[k])["model"]
                for k in ("finetune_checkpoint", "segmentation_checkpoint"))
    seg_backbone = {k: v for k, v in seg.items() if k.startswith("backbone.")}
    assert any(k.startswith("backbone.pyramid.") for k in seg_backbone)
    assert any(k.startswith("backbone.net.") for k in seg_backbone)
    for k, v in seg_backbone.items():
        assert torch.equal(v, det[k]), k
    # every training run writes TensorBoard event files next to its metrics.json
    for ckpt in (summary["pretrain_checkpoint"], summary["finetune_checkpoint"], summary["segmentation_checkpoint"]):
        assert glob.glob(os.path.join(os.path.dirname(ckpt), "events.out.tfevents.*")), ckpt

    for folder in (summary["reconstructions"], summary["predictions"], summary["segmentations"]):
        pngs = glob.glob(os.path.join(folder, "*.png")) + glob.glob(os.path.join(folder, "*.jpg"))
        assert pngs, folder
        for p in pngs:
            assert cv2.imread(p) is not None, p
