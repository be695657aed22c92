"""Reconstruction figures: the panel composer, de-normalisation, the tool and the hook."""
import json
import os
import textwrap
import types

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from itpn_d2.modeling.unit_layout import denormalize_unit_predictions, patchify_units, unpatchify_units
from itpn_d2.utils.visualize_mim import (
    compose_reconstruction_panel, masked_unit_errors, panels_from_model_output, stack_rows,
)
from itpn_d2.utils.panel_titles import TITLE_HEIGHT

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

TINY_CONFIG = textwrap.dedent(
    """
    from detectron2.config import LazyCall as L
    from itpn_d2.modeling.backbone import ITPNBackbone
    from itpn_d2.modeling.decoder import PixelDecoder
    from itpn_d2.modeling.hivit import HiViT
    from itpn_d2.modeling.masking import RandomMaskGenerator
    from itpn_d2.modeling.pretrainer import MaskedPretrainer
    from itpn_d2.modeling.pyramid import FeaturePyramid

    model = L(MaskedPretrainer)(
        backbone=L(ITPNBackbone)(
            net=L(HiViT)(embed_dim=64, mlp_depths=(1, 1), depth=1, num_heads=2, pretrain_img_size=64),
            pyramid=L(FeaturePyramid)(embed_dim=64, out_dim=32, depth=1),
        ),
        mask_generator=L(RandomMaskGenerator)(),
        pixel_decoder=L(PixelDecoder)(in_dim=32, dec_dim=32, depth=1, num_heads=2, pretrain_img_size=64),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
        mask_ratio=0.75,
    )
    train = dict(device="cpu")
    """
)


def _rand_image(seed, h=64, w=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float()


def test_panel_layout_and_exact_paste():
    image = _rand_image(0)
    recon = _rand_image(1)
    mask = torch.zeros(4 * 6, dtype=torch.bool)
    mask[torch.randperm(24, generator=torch.Generator().manual_seed(0))[:18]] = True
    panel = compose_reconstruction_panel(image, mask, recon, unit=16, gap=4)
    H, W, gap = 64, 96, 4
    assert panel.shape == (H, 4 * W + 3 * gap, 3) and panel.dtype == np.uint8
    orig = image.permute(1, 2, 0).numpy().astype(np.uint8)
    rec = recon.permute(1, 2, 0).numpy().astype(np.uint8)
    parts = [panel[:, i * (W + gap): i * (W + gap) + W] for i in range(4)]
    assert (panel[:, W: W + gap] == 255).all()
    pix = np.kron(mask.view(4, 6).numpy(), np.ones((16, 16))).astype(bool)
    assert np.array_equal(parts[0], orig)
    assert (parts[1][pix] == 128).all() and np.array_equal(parts[1][~pix], orig[~pix])
    assert np.array_equal(parts[2], rec)
    assert np.array_equal(parts[3][~pix], orig[~pix])  # visible units: original pixels, bit-exact
    assert np.array_equal(parts[3][pix], rec[pix])
    with pytest.raises(ValueError, match="grid"):
        compose_reconstruction_panel(image, mask[:10], recon)
    assert stack_rows([panel, panel], gap=2).shape == (2 * H + 2, panel.shape[1], 3)


def _normalize(image):
    return (image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _to_image(pred, image, norm_pix=True):
    """(N, 768) per-unit predictions in the loss's space -> (3, H, W) 0-255, as the model does it."""
    x = _normalize(image)[None]
    pred = pred.reshape(1, -1, 1, 1, pred.shape[-1])
    if norm_pix:
        pred = denormalize_unit_predictions(pred, x, 16)
    grid = (image.shape[-2] // 16, image.shape[-1] // 16)
    return unpatchify_units(pred, grid, 16)[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def test_denormalize_inverts_the_models_norm_pix_targets():
    from itpn_d2.modeling.pretrainer import norm_targets

    image = _rand_image(2)
    x = _normalize(image)
    raw_units = patchify_units(x[None], 16, 1).flatten(1, 3)[0]  # (N, 768) as the model's targets
    assert torch.equal(unpatchify_units(raw_units.reshape(1, -1, 1, 1, 768), (4, 6), 16)[0], x)
    targets = norm_targets(raw_units)
    rec = _to_image(targets, image, norm_pix=True)
    assert torch.allclose(rec, image, atol=1e-3)
    rec = _to_image(raw_units, image, norm_pix=False)
    assert torch.allclose(rec, image, atol=1e-3)
    # a wrong prediction must not come back as the image
    rec = _to_image(torch.zeros_like(targets), image)
    assert not torch.allclose(rec, image, atol=1.0)


@pytest.fixture(scope="module")
def tiny_model():
    from detectron2.config import LazyConfig, instantiate

    torch.manual_seed(0)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"itpn_tiny_vis_cfg_{os.getpid()}.py")
    with open(path, "w") as f:
        f.write(TINY_CONFIG)
    try:
        model = instantiate(LazyConfig.load(path).model)
    finally:
        os.remove(path)
    return model.eval()


def test_panels_from_model_output(tiny_model):
    images = [_rand_image(3, 64, 64), _rand_image(4, 64, 64)]
    with torch.no_grad():
        out = tiny_model([{"image": im} for im in images])
    panels = panels_from_model_output(out, unit=16)
    assert len(panels) == 2
    for im, p, m in zip(images, panels, out["mask"]):
        assert p.shape == (64, 4 * 64 + 3 * 4, 3)
        pix = np.kron(m.numpy(), np.ones((16, 16))).astype(bool)
        pasted = p[:, 3 * 68:]
        assert np.array_equal(pasted[~pix], im.permute(1, 2, 0).numpy().astype(np.uint8)[~pix])
        assert pix.mean() == pytest.approx(0.75)

    # The per-unit contract ((N, 768) normalised predictions) gives the model's own reconstruction.
    x = tiny_model.preprocess_image([{"image": images[0]}])
    gen = torch.Generator().manual_seed(tiny_model.eval_mask_seed)
    ids_keep, _ = tiny_model.make_mask(1, (4, 4), generator=gen)
    with torch.no_grad():
        pred = tiny_model.predict(x, ids_keep)["mim"][0]
    rec = _to_image(pred, images[0], norm_pix=True)
    assert torch.allclose(rec, out["pred_pixels"][0], atol=1e-2)
    p_list = compose_reconstruction_panel(images[0], out["mask"][0].flatten(), rec)
    assert np.abs(p_list.astype(int) - panels[0].astype(int)).max() <= 1


def _write_images(folder, n):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(os.path.join(folder, f"img{i}.jpg"), rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8))


def test_masked_unit_errors_line_is_each_units_true_colour():
    image = _rand_image(3, 32, 48)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = True
    exact = masked_unit_errors(image, mask, image, unit=16)
    assert exact["mse"] == 0 and exact["ratio"] == 0 and exact["masked_units"] == 2
    # each unit filled with its own mean colour: the line itself (ratio 1, up to uint8 rounding)
    flat = image.reshape(3, 2, 16, 3, 16).mean(dim=(2, 4), keepdim=True).expand(3, 2, 16, 3, 16).reshape(3, 32, 48)
    assert masked_unit_errors(image, mask, flat, unit=16)["ratio"] == pytest.approx(1.0, abs=0.01)
    # one colour for the whole image (a typical background colour) is worse than the line
    grey = image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    assert masked_unit_errors(image, mask, grey, unit=16)["ratio"] > 1.0
    # only the masked units count: wrecking a visible unit changes nothing
    wrecked = image.clone()
    wrecked[:, :16, :16] = 0
    assert masked_unit_errors(image, mask, wrecked, unit=16)["mse"] == 0
    with pytest.raises(ValueError, match="no masked unit"):
        masked_unit_errors(image, torch.zeros(2, 3, dtype=torch.bool), image, unit=16)
    with pytest.raises(ValueError, match="do not tile"):
        masked_unit_errors(image[:, :30], mask, image[:, :30], unit=16)
    # per-level prediction is de-normalised by 4-px tokens: the line is then each 4-px token's colour,
    # which 16-px flat blocks no longer reach
    fine = masked_unit_errors(image, mask, flat, unit=16, token=4)
    assert fine["flat_mse"] < exact_line(image, mask) and fine["ratio"] > 1.0
    # masked units that are flat: no ratio (not a division by zero that swamps the mean)
    plain = torch.full_like(image, 100.0)
    assert masked_unit_errors(plain, mask, plain, unit=16)["ratio"] is None


def exact_line(image, mask):
    flat = image.reshape(3, 2, 16, 3, 16).mean(dim=(2, 4), keepdim=True).expand(3, 2, 16, 3, 16).reshape(3, 32, 48)
    return masked_unit_errors(image, mask, flat, unit=16)["mse"]


def test_tool_writes_pngs(tmp_path, tiny_model):
    from itpn_d2.utils import reconstruction_figures as tool

    cfg = tmp_path / "tiny_cfg.py"
    cfg.write_text(TINY_CONFIG)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": tiny_model.state_dict(), "iteration": 5}, ckpt)
    inp = tmp_path / "in" / "sub"
    _write_images(str(inp), 2)
    (inp / "broken.jpg").write_bytes(b"not a jpeg")
    out_dir = tmp_path / "out"
    written = tool.main(
        ["--config-file", str(cfg), "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"),
         "--output", str(out_dir), "--size", "64"]
    )
    assert sorted(os.path.basename(w) for w in written) == ["sub__img0.png", "sub__img1.png"]
    for w in written:
        figure = np.asarray(Image.open(w))
        assert figure.shape == (TITLE_HEIGHT + 64, 4 * 64 + 3 * 4, 3)
        assert (figure[:TITLE_HEIGHT] < 128).any()  # the panel titles
    with open(out_dir / "reconstruction_errors.json") as f:
        errors = json.load(f)
    assert sorted(errors["images"]) == ["sub__img0.png", "sub__img1.png"]
    ratios = [e["ratio"] for e in errors["images"].values()]
    assert all(0 < r < float("inf") for r in ratios) and errors["mean_ratio"] == pytest.approx(sum(ratios) / 2)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tool.main(["--config-file", str(cfg), "--checkpoint", str(tmp_path / "missing.pth"),
                   "--input", str(inp / "img0.jpg"), "--output", str(out_dir)])


def test_hook_writes_png_without_touching_training_state(tmp_path, tiny_model):
    from itpn_d2.engine.hooks import ReconstructionVisualizer

    folder = tmp_path / "imgs"
    _write_images(str(folder), 3)
    files = sorted(str(p) for p in folder.iterdir())
    hook = ReconstructionVisualizer(2, str(tmp_path / "run"), file_names=files, num_images=2, image_size=64)
    tiny_model.train()
    hook.trainer = types.SimpleNamespace(model=tiny_model, iter=0, max_iter=10)
    rng_before = torch.get_rng_state()
    hook.after_step()  # iteration 1: not a multiple of the period
    assert not (tmp_path / "run" / "reconstructions").exists()
    hook.trainer.iter = 1
    hook.after_step()
    png = tmp_path / "run" / "reconstructions" / "iter_0000002.png"
    assert png.is_file()
    assert Image.open(png).size == (4 * 64 + 3 * 4, TITLE_HEIGHT + 2 * 64 + 4)
    assert tiny_model.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    tiny_model.eval()
