#!/usr/bin/env python
"""
Visualise what an iTPN pre-training model reconstructs.

For each input image, writes ``OUTPUT/<name>.png``: four titled panels,
original | masked input (masked units grey) | reconstruction | reconstruction with the
visible units pasted back. The masks come from the model's eval-mode generator
(``model.eval_mask_seed``), so figures are reproducible. The log names the checkpoint loaded.

Example (the checkpoint of ``make demo``'s pre-training stage)::

    python tools/visualize_reconstruction.py \\
        --config-file configs/pretrain/mim_mfm_itpn_tiny_cpu.py \\
        --checkpoint output/demo/pretrain/model_final.pth \\
        --input datasets/itpn_synthetic/val/images --output output/recon \\
        --opts train.device=cpu
"""
import argparse
import logging
import os
import sys

import torch
from detectron2.config import instantiate
from detectron2.utils.logger import setup_logger
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from itpn_d2.checkpoint import BackboneLoadError, CheckpointFileError  # noqa: E402
from itpn_d2.data.image_folder import IMAGE_EXTENSIONS, load_image_folder  # noqa: E402
from itpn_d2.config import ConfigOverrideError, add_opts_argument, load_config  # noqa: E402
from itpn_d2.utils.panel_titles import add_panel_titles  # noqa: E402
from itpn_d2.utils.visualize_mim import load_eval_image, panels_from_model_output  # noqa: E402
from itpn_d2.utils.weights import load_weights  # noqa: E402

logger = logging.getLogger("itpn_d2.visualize_reconstruction")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="pre-training LazyConfig")
    p.add_argument("--checkpoint", default="", help="pre-training checkpoint (.pth); empty: random weights")
    p.add_argument("--input", required=True, help="an image file or a folder (searched recursively)")
    p.add_argument("--output", required=True, help="folder for the PNGs (created)")
    p.add_argument("--max-images", type=int, default=16, help="at most this many images from a folder")
    p.add_argument(
        "--size", type=int, default=None,
        help="input side (shorter side resized, centre crop); default: the config's mapper image_size or 224",
    )
    p.add_argument("--device", default=None, help="default: train.device of the config, else cpu")
    add_opts_argument(p)
    return p


def _input_files(path: str, max_images: int):
    if os.path.isdir(path):
        return [d["file_name"] for d in load_image_folder(path)][:max_images]
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"--input '{path}' is neither an image file nor a folder")


def _output_name(file_name: str, root: str) -> str:
    rel = os.path.relpath(file_name, root) if os.path.isdir(root) else os.path.basename(file_name)
    stem = os.path.splitext(rel)[0].replace(os.sep, "__")
    return stem + ".png"


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="itpn_d2")
    cfg = load_config(args.config_file, args.opts)
    size = args.size
    if size is None:
        try:
            size = int(cfg.dataloader.train.mapper.image_size)
        except Exception:
            size = 224
    device = args.device or cfg.get("train", {}).get("device", "cpu")

    model = instantiate(cfg.model)
    # empty --checkpoint: a randomly initialised model, on purpose (warned)
    load_weights(model, args.checkpoint, allow_random=True, log=logger)
    model.to(device).eval()
    if not hasattr(model, "reconstruct") and not hasattr(model, "pixel_decoder"):
        logger.warning(f"{type(model).__name__} does not look like a pre-training model")

    files = _input_files(args.input, args.max_images)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for f in files:
        try:
            image = load_eval_image(f, size)
        except Exception as e:
            logger.warning(f"Skipping unreadable image '{f}' ({type(e).__name__}: {e})")
            continue
        with torch.no_grad():
            out = model([{"image": image.to(device)}])
        (panel,) = panels_from_model_output(out)
        dst = os.path.join(args.output, _output_name(f, args.input))
        Image.fromarray(add_panel_titles(panel)).save(dst)
        written.append(dst)
        logger.info(f"{f} -> {dst}")
    if not written:
        raise RuntimeError(f"no readable image in '{args.input}' (extensions {list(IMAGE_EXTENSIONS)})")
    logger.info(f"Wrote {len(written)} reconstruction figure(s) to {args.output}")
    return written


def cli(argv=None):
    try:
        return main(argv)
    except (ConfigOverrideError, CheckpointFileError, BackboneLoadError, FileNotFoundError) as e:
        msg = str(e) if isinstance(e, BackboneLoadError) else str(e).splitlines()[0]
        print(f"ERROR: {msg}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigOverrideError) else 1)


if __name__ == "__main__":
    cli()
