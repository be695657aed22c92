"""A title row above a figure of side-by-side panels (the reconstruction figures).

The panels of a reconstruction figure (:mod:`itpn_d2.utils.visualize_mim`) are equally wide
and separated by ``gap`` pixels; :func:`add_panel_titles` puts one caption centred over each,
in a white strip of :data:`TITLE_HEIGHT` pixels, drawn with PIL's built-in bitmap font (no
font file needed).
"""
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["RECONSTRUCTION_TITLES", "TITLE_HEIGHT", "add_panel_titles"]

RECONSTRUCTION_TITLES = ("original", "masked input", "reconstruction", "recon. + visible")
TITLE_HEIGHT = 16


def add_panel_titles(
    figure: np.ndarray,
    titles: Sequence[str] = RECONSTRUCTION_TITLES,
    *,
    gap: int = 4,
    background: int = 255,
) -> np.ndarray:
    """
    Args:
        figure: (H, n*W + (n-1)*gap, 3) uint8, ``n = len(titles)`` panels side by side.
        titles: one caption per panel, left to right; a caption wider than its panel is clipped.
    Returns:
        (TITLE_HEIGHT + H, n*W + (n-1)*gap, 3) uint8: the title row, then ``figure`` unchanged.
    """
    n = len(titles)
    width = figure.shape[1]
    panel = (width - (n - 1) * gap) / n
    if figure.ndim != 3 or panel != int(panel) or panel <= 0:
        raise ValueError(f"a figure {tuple(figure.shape)} is not {n} panels separated by {gap} px")
    panel = int(panel)
    strip = Image.new("RGB", (width, TITLE_HEIGHT), (background,) * 3)
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for i, title in enumerate(titles):
        left, _, right, bottom = draw.textbbox((0, 0), title, font=font)
        x = i * (panel + gap) + max(0, (panel - (right - left)) // 2)
        y = max(0, (TITLE_HEIGHT - bottom) // 2)
        # each caption drawn on its own panel-wide canvas, so a long one cannot run into the next
        cell = Image.new("RGB", (panel, TITLE_HEIGHT), (background,) * 3)
        ImageDraw.Draw(cell).text((x - i * (panel + gap), y), title, fill=(0, 0, 0), font=font)
        strip.paste(cell, (i * (panel + gap), 0))
    return np.concatenate([np.asarray(strip, dtype=np.uint8), figure], axis=0)
