"""tools/demo.py (itpn_d2.utils.demo) on CPU with tiny Mask R-CNN and UPerNet configs and random weights saved
to a checkpoint: images, a folder, a glob, a video; outputs are valid renderings."""

import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from itpn_d2.utils import demo
from itpn_d2.utils.predictor import LazyPredictor
from itpn_d2.utils.weights import load_weights
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT

MASK_RCNN_TINY = f"""
from detectron2.config import LazyConfig
from itpn_d2.modeling import hivit_arch

model = LazyConfig.load({os.path.join(ROOT, "configs/common/models/mask_rcnn_itpn.py")!r}).model
model.backbone.net.update(hivit_arch("tiny"))
model.backbone.net.drop_path_rate = 0.0
model.roi_heads.num_classes = 3
model.roi_heads.box_head.conv_dims = [16]
model.roi_heads.mask_head.conv_dims = [16]
model.proposal_generator.post_nms_topk = (50, 20)
model.roi_heads.box_predictor.test_topk_per_image = 5
train = dict(init_checkpoint="", device="cuda")
"""

UPER_TINY = f"""
from detectron2.config import LazyConfig
from itpn_d2.modeling import hivit_arch

model = LazyConfig.load({os.path.join(ROOT, "configs/common/models/uper_itpn.py")!r}).model
model.backbone.net.update(hivit_arch("tiny"))
model.backbone.pyramid.out_dim = 16
model.sem_seg_head.update(channels=16, aux_channels=8, num_classes=4)
"""


def _images(folder, sizes):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        img = np.full((h, w, 3), 30, np.uint8)
        cv2.rectangle(img, (8, 8), (w // 2, h // 2), tuple(int(c) for c in rng.randint(80, 255, 3)), -1)
        cv2.circle(img, (3 * w // 4, 3 * h // 4), h // 5, (200, 60, 90), -1)
        p = os.path.join(folder, f"img{i}.png")
        cv2.imwrite(p, img)
        paths.append(p)
    return paths


def _config_and_checkpoint(tmp_path, text, name):
    cfg_path = tmp_path / f"{name}.py"
    cfg_path.write_text(text)
    cfg = LazyConfig.load(str(cfg_path))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    ckpt = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    return str(cfg_path), str(ckpt), model.state_dict()


def _check_rendering(out_path, in_path):
    assert os.path.isfile(out_path), out_path
    out = cv2.imread(out_path)
    src = cv2.imread(in_path)
    assert out is not None and out.shape == src.shape, (out_path, None if out is None else out.shape)
    return out, src


def test_demo_loads_the_checkpoint_weights(tmp_path):
    cfg_path, ckpt, sd = _config_and_checkpoint(tmp_path, MASK_RCNN_TINY, "mrcnn")
    args = demo.get_parser().parse_args(
        ["--config-file", cfg_path, "--input", "x", "--opts", f"train.init_checkpoint={ckpt}"]
    )
    cfg = demo.setup_cfg(args)
    assert cfg.train.device == "cpu"
    assert cfg.model.roi_heads.box_predictor.test_score_thresh == 0.5
    torch.manual_seed(123)  # different random init than the checkpoint
    predictor = LazyPredictor(cfg)
    load_weights(predictor.model, cfg.train.init_checkpoint, backbone_load=cfg.train.get("backbone_load", "strict"))
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_demo_mask_rcnn_images_folder_and_glob(tmp_path):
    cfg_path, ckpt, _ = _config_and_checkpoint(tmp_path, MASK_RCNN_TINY, "mrcnn")
    imgs = _images(str(tmp_path / "in"), [(96, 128), (80, 112)])
    out_dir = tmp_path / "out"
    common = ["--config-file", cfg_path, "--confidence-threshold", "0.0", "--opts", f"train.init_checkpoint={ckpt}"]
    # Two files into a folder.
    demo.main(["--input", *imgs, "--output", str(out_dir)] + common)
    for p in imgs:
        out, src = _check_rendering(str(out_dir / os.path.basename(p)), p)
        assert not np.array_equal(out, src)  # boxes / masks were drawn
    # A glob matching one image, written to the given file name.
    demo.main(["--input", str(tmp_path / "in" / "img1*"), "--output", str(tmp_path / "single.png")] + common)
    _check_rendering(str(tmp_path / "single.png"), imgs[1])


def test_expand_inputs_files_folders_globs(tmp_path):
    imgs = _images(str(tmp_path / "in"), [(32, 32), (32, 48)])
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    assert demo.expand_inputs([str(tmp_path / "in")]) == imgs
    assert demo.expand_inputs([str(tmp_path / "in" / "img*.png")]) == imgs
    assert demo.expand_inputs([imgs[1], imgs[0]]) == [imgs[1], imgs[0]]


def test_demo_sem_seg_with_bf16_and_video(tmp_path):
    cfg_path, ckpt, _ = _config_and_checkpoint(tmp_path, UPER_TINY, "uper")
    imgs = _images(str(tmp_path / "in"), [(96, 128), (64, 160)])
    common = ["--config-file", cfg_path, "--opts", f"train.init_checkpoint={ckpt}"]
    demo.main(["--input", *imgs, "--output", str(tmp_path / "out"), "--bf16"] + common)
    for p in imgs:
        out, src = _check_rendering(str(tmp_path / "out" / os.path.basename(p)), p)
        assert not np.array_equal(out, src)  # the label overlay

    video = str(tmp_path / "clip.avi")
    vw = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5, (128, 96), True)
    assert vw.isOpened()
    for i in range(3):
        vw.write(np.roll(cv2.imread(imgs[0]), 8 * i, axis=1))
    vw.release()
    out_video = str(tmp_path / "clip_vis.avi")
    demo.main(["--video-input", video, "--output", out_video] + common)
    cap = cv2.VideoCapture(out_video)
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 3


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    cfg_path, _, _ = _config_and_checkpoint(tmp_path, UPER_TINY, "uper")
    with pytest.raises(SystemExit) as e:
        demo.main(["--config-file", cfg_path, "--input", str(tmp_path / "nothing*.png")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "ERROR: --input" in err and "no image files" in err
    with pytest.raises(SystemExit):
        demo.main(["--config-file", cfg_path])


def test_sem_seg_rendering_leaves_the_background_class_undrawn():
    from detectron2.data import Metadata

    from itpn_d2.utils.predictor import sem_seg_labels_to_draw, visualize

    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    logits = torch.zeros(3, 32, 48)
    logits[0] = 1.0  # background everywhere ...
    logits[2, 8:16, 8:24] = 2.0  # ... but one box of class 2
    classes = dict(stuff_classes=["background", "a", "b"], stuff_colors=[[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    with_bg = Metadata(name="render_bg_test", background_label=0, **classes)
    plain = Metadata(name="render_plain_test", **classes)
    labels = sem_seg_labels_to_draw(logits, with_bg)
    assert set(labels.unique().tolist()) == {2, 3}  # background -> a value the Visualizer skips
    assert set(sem_seg_labels_to_draw(logits, plain).unique().tolist()) == {0, 2}
    rgb = bgr[:, :, ::-1]
    drawn = visualize(bgr, {"sem_seg": logits}, with_bg)
    outside = np.ones((32, 48), bool)
    outside[6:18, 6:26] = False  # the box and its drawn edge
    # the image shows through (all but the class's text label, which may overhang the box)
    assert (np.abs(drawn[outside].astype(int) - rgb[outside]).max(axis=-1) <= 2).mean() > 0.8
    assert np.abs(drawn[10:14, 12:20].astype(int) - rgb[10:14, 12:20]).mean() > 20  # the class is painted
    darkened = visualize(bgr, {"sem_seg": logits}, plain)  # without background_label it is painted black
    assert np.abs(darkened[outside].astype(int) - rgb[outside]).mean() > 20
