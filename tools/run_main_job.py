#!/usr/bin/env python
"""The main job (``make demo``): pre-train, fine-tune with the pre-trained pyramid for detection,
train a semantic segmentation head on the detector's backbone and pyramid, evaluate and visualise,
on the built-in generated data, on CPU.

Stages, each a plain command printed before it runs (re-run or change any one; the configs are
``configs/pretrain/mim_mfm_itpn_tiny_demo.py``, ``configs/COCO/mask_rcnn_itpn_tiny_demo.py`` and
``configs/ADE20K/uper_itpn_tiny_demo_frozen.py``):
  1. generate (or reuse) the built-in dataset     datasets/generate_synthetic.py
  2. pre-train tiny iTPN, MIM + MFM (EMA teacher)  tools/lazyconfig_train_net.py, the pre-training config
  3. fine-tune Mask R-CNN from that checkpoint     tools/lazyconfig_train_net.py, the Mask R-CNN config
     (strict load: every encoder and pyramid tensor comes from stage 2), COCOEvaluator at the end
  4. train UPerNet's head on stage 3's frozen      tools/lazyconfig_train_net.py, the UPerNet config
     encoder + pyramid (strict load of the detector's), SemSegEvaluator (mIoU) and
     ObjectLabelEvaluator (objects whose pixels are mostly their own class) at the end
  5. reconstructions of the pre-trained model      tools/visualize_reconstruction.py
     (with their error against each masked unit's true colour: reconstruction_errors.json)
  6. detections on validation images              tools/demo.py
  7. segmentations of the same images             tools/demo.py
and a summary: box AP, mask AP, mIoU, the objects labelled right, the reconstruction error ratio, the time of each stage and
where everything is.

    python tools/run_main_job.py                    # the full job (about 14 minutes on 2 cores)
    python tools/run_main_job.py --quick            # a few iterations per stage (what the test runs)
"""
import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from itpn_d2.utils.job_stages import StageFailedError, available_cores, run_stage  # noqa: E402

PRETRAIN_CFG = "configs/pretrain/mim_mfm_itpn_tiny_demo.py"
FINETUNE_CFG = "configs/COCO/mask_rcnn_itpn_tiny_demo.py"
SEG_CFG = "configs/ADE20K/uper_itpn_tiny_demo_frozen.py"


def _stage(title: str, cmd, log_path: str) -> float:
    return run_stage(title, cmd, log_path, cwd=ROOT)


def main(argv=None) -> None:
    try:
        run_job(argv)
    except StageFailedError as e:  # run_stage printed the end of its log
        sys.exit(e.returncode)


def run_job(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="output/demo")
    p.add_argument("--data-root", default=None, help="built-in data folder (default: itpn_d2's default root)")
    p.add_argument("--quick", action="store_true", help="a few iterations per stage and a small dataset (tests)")
    p.add_argument("--pretrain-iters", type=int, default=None, help="pre-training iterations (default: the config's)")
    p.add_argument("--finetune-iters", type=int, default=None,
                   help="Mask R-CNN iterations (default: the config's); its lr steps keep their fractions of the run")
    p.add_argument("--seg-iters", type=int, default=None,
                   help="UPerNet head iterations (default: the config's, 2200)")
    p.add_argument("--num-demo-images", type=int, default=4)
    p.add_argument("--finetune-procs", type=int, default=None,
                   help="CPU processes for fine-tuning (detectron2's --num-gpus, gloo); default 2 on a "
                        "machine with 2+ cores: a Mask R-CNN step is largely single-threaded, so two "
                        "processes with one thread each are ~20%% faster than one with two")
    args = p.parse_args(argv)

    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    t_start = time.perf_counter()

    pre_iters = args.pretrain_iters or (4 if args.quick else None)
    ft_iters = args.finetune_iters or (4 if args.quick else None)
    seg_iters = args.seg_iters or (4 if args.quick else None)
    log_every = ["train.log_period=1"] if args.quick else []
    took = {}
    data_root = os.path.abspath(args.data_root) if args.data_root else None
    gen = [py, "datasets/generate_synthetic.py"]
    if data_root:
        gen += ["--root", data_root]
        os.environ["ITPN_SYNTHETIC_ROOT"] = data_root
    if args.quick:
        gen += ["--num-train", "8", "--num-val", "4", "--num-unlabeled", "16"]
        if not data_root:
            sys.exit("--quick needs --data-root (the quick dataset must not replace the default one)")
    took["data"] = _stage("1/7 built-in data", gen, os.path.join(out, "generate.log"))

    pre_dir = os.path.join(out, "pretrain")
    cmd = [py, "tools/lazyconfig_train_net.py", "--config-file", PRETRAIN_CFG, f"train.output_dir={pre_dir}"]
    if pre_iters:
        cmd += [f"train.max_iter={pre_iters}", f"train.checkpointer.period={pre_iters}", *log_every]
    took["pretrain"] = _stage("2/7 pre-training (MIM + MFM, EMA teacher)", cmd, os.path.join(out, "pretrain.log"))
    pre_ckpt = os.path.join(pre_dir, "model_final.pth")

    ft_dir = os.path.join(out, "finetune")
    procs = args.finetune_procs or (2 if available_cores() >= 2 else 1)
    # a free port: detectron2's default is one fixed port per user, so a second multi-process run on the
    # machine (another demo, the tests) would stop this one with EADDRINUSE
    free_port = ["--dist-url", "auto"] if procs > 1 else []
    cmd = [py, "tools/lazyconfig_train_net.py", "--num-gpus", str(procs), *free_port, "--config-file", FINETUNE_CFG,
           f"train.init_checkpoint={pre_ckpt}", "train.backbone_load=strict", f"train.output_dir={ft_dir}"]
    if ft_iters:
        cmd += [f"train.max_iter={ft_iters}", f"train.eval_period={ft_iters}", f"train.checkpointer.period={ft_iters}", *log_every]
    if args.quick:
        # a 4-iteration detector scores everything below the usual 0.05; keep its boxes so that
        # COCOEvaluator's bbox and segm paths both run (with no detections segm is skipped)
        cmd += ["model.roi_heads.box_predictor.test_score_thresh=0.0"]
    took["detection"] = _stage(
        "3/7 fine-tuning Mask R-CNN from the pre-trained backbone + pyramid, then COCO evaluation", cmd,
        os.path.join(out, "finetune.log"))
    ft_ckpt = os.path.join(ft_dir, "model_final.pth")

    # The 15 minutes go to detection first: its AP comes from the iterations at the full lr, and climbs
    # steeply past ~1000 of them (configs/COCO/mask_rcnn_itpn_tiny_demo.py). This stage then trains
    # UPerNet's head on the detector's frozen encoder and pyramid, which already tell the shapes apart:
    # 2200 iterations at batch 2 of a stride-8 head (reading the pyramid's p2 space-to-depth, likely where
    # the detector learnt the shapes) give mIoU 62.3 +- 1.6 over five detectors (Intel Xeon; 60.3 at seed 0;
    # 58.4 +- 1.5 from the pre-training with the narrower pixel decoder before);
    # 150 fine-tuning iterations from the pre-training took about as long for 15.0 (seed 0, Intel Xeon;
    # configs/ADE20K/uper_itpn_tiny_demo_frozen.py, docs/main_job.md). A demo choice:
    # the paper fine-tunes each task from the pre-training, as the ADE20K configs and the ablation do.
    # One process (two threads): a UPerNet step at 144-176 px is small enough that a second process
    # adds start-up and gloo overhead and no speed (80 fine-tuning iterations and the evaluation, on
    # the idle 2-core EPYC, 2026-11-30: 58 s as one process, 74 s as two; docs/main_job.md).
    seg_dir = os.path.join(out, "segmentation")
    cmd = [py, "tools/lazyconfig_train_net.py", "--config-file", SEG_CFG,
           f"train.init_checkpoint={ft_ckpt}", "train.backbone_load=strict", f"train.output_dir={seg_dir}"]
    if seg_iters:
        cmd += [f"train.max_iter={seg_iters}", f"train.eval_period={seg_iters}",
                f"train.checkpointer.period={seg_iters}", *log_every]
    took["segmentation"] = _stage(
        "4/7 training UPerNet's head on the detector's frozen backbone + pyramid, then SemSegEvaluator (mIoU) "
        "and ObjectLabelEvaluator",
        cmd,
        os.path.join(out, "segmentation.log"))
    seg_ckpt = os.path.join(seg_dir, "model_final.pth")

    from itpn_d2.data import default_synthetic_root  # noqa: E402  (after the data stage chose the root)

    root = data_root or default_synthetic_root()
    val_images = sorted(glob.glob(os.path.join(root, "val", "images", "*")))[: args.num_demo_images]
    recon_dir = os.path.join(out, "reconstructions")
    took["reconstructions"] = _stage("5/7 reconstructions of the pre-trained model",
              [py, "tools/visualize_reconstruction.py", "--config-file", PRETRAIN_CFG, "--checkpoint", pre_ckpt,
               "--input", os.path.join(root, "val", "images"), "--max-images", str(args.num_demo_images),
               "--output", recon_dir, "--opts", "train.device=cpu"],
              os.path.join(out, "reconstruct.log"))
    pred_dir = os.path.join(out, "predictions")
    took["detections"] = _stage(
        "6/7 detections on validation images",
        [py, "tools/demo.py", "--config-file", FINETUNE_CFG, "--input", *val_images, "--output", pred_dir,
         "--opts", f"train.init_checkpoint={ft_ckpt}"],
        os.path.join(out, "demo.log"))
    seg_pred_dir = os.path.join(out, "segmentations")
    took["segmentations"] = _stage(
        "7/7 segmentations of the same images",
        [py, "tools/demo.py", "--config-file", SEG_CFG, "--input", *val_images, "--output", seg_pred_dir,
         "--opts", f"train.init_checkpoint={seg_ckpt}"],
        os.path.join(out, "demo_seg.log"))

    from itpn_d2.utils.metrics_json import merged_metrics

    m = merged_metrics(ft_dir)
    box_ap, mask_ap = m.get("bbox/AP"), m.get("segm/AP")
    seg_metrics = merged_metrics(seg_dir)
    miou = seg_metrics.get("sem_seg/mIoU")
    # objects of the validation images painted mostly in their own class (ObjectLabelEvaluator)
    objects = {k.split("/", 1)[1]: v for k, v in seg_metrics.items() if k.startswith("object_labels/")}
    try:  # a meter, not a result: its absence must not cost the summary of a 14-minute run
        with open(os.path.join(recon_dir, "reconstruction_errors.json")) as f:
            recon_ratio = json.load(f)["mean_ratio"]
    except (OSError, KeyError, ValueError) as e:
        print(f"  (no reconstruction meter: {type(e).__name__}: {e})")
        recon_ratio = None
    summary = {
        "box_AP": box_ap, "mask_AP": mask_ap, "box_AP50": m.get("bbox/AP50"), "mask_AP50": m.get("segm/AP50"),
        "mIoU": miou,
        "object_labels": objects or None,
        # masked units' error / the error of filling each with its true colour (< 1: shapes drawn)
        "reconstruction_error_ratio": recon_ratio,
        "pretrain_checkpoint": pre_ckpt, "finetune_checkpoint": ft_ckpt, "segmentation_checkpoint": seg_ckpt,
        "metrics": [os.path.join(pre_dir, "metrics.json"), os.path.join(ft_dir, "metrics.json"),
                    os.path.join(seg_dir, "metrics.json")],
        "reconstructions": recon_dir, "predictions": pred_dir, "segmentations": seg_pred_dir,
        "stage_seconds": {k: round(v, 1) for k, v in took.items()},
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    print("\n=== Summary")
    print(f"  box AP {fmt(box_ap)}   mask AP {fmt(mask_ap)}   (COCOEvaluator on itpn_synthetic_val)")
    print(f"  box AP50 {fmt(summary['box_AP50'])}   mask AP50 {fmt(summary['mask_AP50'])}")
    print(f"  mIoU {fmt(miou)}   (SemSegEvaluator on itpn_synthetic_sem_seg_val, 7 classes)")
    if "right" in objects and "objects" in objects:
        per_class = ", ".join(f"{k[len('pct-'):]} {v:.0f}%" for k, v in objects.items() if k.startswith("pct-"))
        print(f"  objects labelled right {objects['right']:.0f}/{objects['objects']:.0f}   (the commonest label of "
              f"each object's pixels is its class: {per_class})")
    print("  stage times            : " + ", ".join(f"{k} {v:.0f}s" for k, v in took.items()))
    print(f"  pre-trained checkpoint : {pre_ckpt}")
    print(f"  fine-tuned checkpoints : {ft_ckpt}, {seg_ckpt}")
    print(f"  metrics                : {', '.join(summary['metrics'])}")
    print(f"  reconstructions        : {recon_dir} (masked-unit error / their true colours' "
          f"error: {'n/a' if recon_ratio is None else f'{recon_ratio:.2f}'}; < 1 means shapes drawn inside the units)")
    print(f"  rendered predictions   : {pred_dir}, {seg_pred_dir}")
    print(f"  total time             : {summary['minutes']} min; summary in {os.path.join(out, 'summary.json')}")


if __name__ == "__main__":
    main()
