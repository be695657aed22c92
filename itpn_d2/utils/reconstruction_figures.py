"""Reconstruction figures of a pre-training model for a folder of images: what
``tools/visualize_reconstruction.py`` writes (it runs :func:`cli`).

For each input image, ``OUTPUT/<name>.png``: four titled panels, original | masked input
(masked units grey) | reconstruction | reconstruction with the visible units pasted back
(:mod:`itpn_d2.utils.visualize_mim`). The masks come from the model's eval-mode generator
(``model.eval_mask_seed``), so figures are reproducible. An unreadable image is skipped
with a warning; a run with none readable is an error.

Beside the figures, ``OUTPUT/reconstruction_errors.json``: per image and on average, the
masked units' error against the line "each masked token in its true mean colour", the tokens
being those the prediction was de-normalised by
(:func:`itpn_d2.utils.visualize_mim.masked_unit_errors`); a ``ratio`` below 1 means the
model draws structure inside the masked units, not just their colours.
"""
import json
import argparse
import logging
import os
from typing import List, Optional

import torch
from detectron2.config import instantiate
from detectron2.utils.logger import setup_logger
from PIL import Image

from itpn_d2.checkpoint import BackboneLoadError, CheckpointFileError
from itpn_d2.config import ConfigOverrideError, add_opts_argument, load_config
from itpn_d2.data.image_folder import IMAGE_EXTENSIONS, load_image_folder
from itpn_d2.utils.panel_titles import add_panel_titles
from itpn_d2.utils.user_errors import exit_on_user_error
from itpn_d2.utils.visualize_mim import load_eval_image, masked_unit_errors, panels_from_model_output
from itpn_d2.utils.weights import load_weights

__all__ = ["get_parser", "input_files", "figure_name", "write_reconstruction_figures", "main", "cli"]

logger = logging.getLogger("itpn_d2.visualize_reconstruction")

# The user's input, not a bug: one ERROR line and a non-zero exit (cli).
USER_ERRORS = (ConfigOverrideError, CheckpointFileError, BackboneLoadError, FileNotFoundError)

DEFAULT_SIZE = 224


def get_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line of ``tools/visualize_reconstruction.py`` (``description``: its ``--help`` text)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def input_files(path: str, max_images: int) -> List[str]:
    """``path`` itself, or the first ``max_images`` images found under the folder ``path``."""
    if os.path.isdir(path):
        return [d["file_name"] for d in load_image_folder(path)][:max_images]
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"--input '{path}' is neither an image file nor a folder")


def figure_name(file_name: str, root: str) -> str:
    """The PNG name for ``file_name``: its path under the folder ``root`` with ``/`` as ``__``
    (images of different sub-folders never share a name), or its base name."""
    rel = os.path.relpath(file_name, root) if os.path.isdir(root) else os.path.basename(file_name)
    stem = os.path.splitext(rel)[0].replace(os.sep, "__")
    return stem + ".png"


def write_reconstruction_figures(
    model: torch.nn.Module, files: List[str], *, input_root: str, output_dir: str, size: int, device
) -> List[str]:
    """One titled figure per readable file of ``files`` into ``output_dir`` (created), named
    by :func:`figure_name` relative to ``input_root``, and ``reconstruction_errors.json``
    (module docstring; an image whose meter cannot be computed, e.g. nothing masked, gets
    ``null``). Returns the figure paths; raises ``RuntimeError`` when no file is readable."""
    os.makedirs(output_dir, exist_ok=True)
    written, errors = [], {}
    for f in files:
        try:
            image = load_eval_image(f, size)
        except Exception as e:  # decoders raise a zoo of types; one bad file must not end the run
            logger.warning(f"Skipping unreadable image '{f}' ({type(e).__name__}: {e})")
            continue
        with torch.no_grad():
            out = model([{"image": image.to(device)}])
        (panel,) = panels_from_model_output(out)
        dst = os.path.join(output_dir, figure_name(f, input_root))
        Image.fromarray(add_panel_titles(panel)).save(dst)
        written.append(dst)
        unit = out["image"].shape[-2] // out["mask"].shape[-2]
        try:
            err = masked_unit_errors(out["image"][0], out["mask"][0], out["pred_pixels"][0], unit=unit,
                                     token=out.get("pred_token_size"))
        except ValueError as e:  # e.g. nothing masked (mask_ratio 0): a figure without a meter
            logger.warning(f"{f}: no reconstruction error ({e})")
            err = None
        errors[os.path.relpath(dst, output_dir)] = err
        if err is not None and err["ratio"] is not None:
            logger.info(f"{f} -> {dst} (masked units: error {err['mse']:.0f}, their true colours "
                        f"{err['flat_mse']:.0f}, ratio {err['ratio']:.2f})")
        else:
            logger.info(f"{f} -> {dst}")
    if not written:
        raise RuntimeError(f"no readable image in '{input_root}' (extensions {list(IMAGE_EXTENSIONS)})")
    ratios = [e["ratio"] for e in errors.values() if e is not None and e["ratio"] is not None]
    mean_ratio = sum(ratios) / len(ratios) if ratios else None
    with open(os.path.join(output_dir, "reconstruction_errors.json"), "w") as fp:
        json.dump({"mean_ratio": mean_ratio, "images": errors}, fp, indent=1)
    if mean_ratio is not None:
        logger.info(f"Masked units' error / their true colours' error, mean over {len(ratios)} images: "
                    f"{mean_ratio:.2f} (< 1: structure inside the units is reconstructed)")
    logger.info(f"Wrote {len(written)} reconstruction figure(s) to {output_dir}")
    return written


def main(argv=None, *, description: Optional[str] = None) -> List[str]:
    """Parse ``argv``, build the config's model with ``--checkpoint``'s weights and write the
    figures. Returns the paths written; raises on bad input (:func:`cli` reports it)."""
    args = get_parser(description).parse_args(argv)
    setup_logger(name="itpn_d2")
    cfg = load_config(args.config_file, args.opts)
    size = args.size
    if size is None:
        try:
            size = int(cfg.dataloader.train.mapper.image_size)
        except Exception:  # a config without that mapper field: the pre-training resolution
            size = DEFAULT_SIZE
    device = args.device or cfg.get("train", {}).get("device", "cpu")

    model = instantiate(cfg.model)
    # empty --checkpoint: a randomly initialised model, on purpose (warned)
    load_weights(model, args.checkpoint, allow_random=True, log=logger)
    model.to(device).eval()
    if not hasattr(model, "reconstruct") and not hasattr(model, "pixel_decoder"):
        logger.warning(f"{type(model).__name__} does not look like a pre-training model")

    files = input_files(args.input, args.max_images)
    return write_reconstruction_figures(model, files, input_root=args.input, output_dir=args.output, size=size,
                                        device=device)


def cli(argv=None, *, description: Optional[str] = None) -> List[str]:
    """:func:`main`, ending the process with one ``ERROR:`` line on bad input (exit status 2
    for a config error, 1 otherwise)."""
    try:
        return main(argv, description=description)
    except USER_ERRORS as e:
        exit_on_user_error(e)
