"""Constants shared by the configs and the package.

``IMAGENET_PIXEL_MEAN`` / ``IMAGENET_PIXEL_STD``: the ImageNet channel statistics in the 0-255
RGB scale the models take their input in (every iTPN model normalises ``(x - mean) / std``
itself). Equal to detectron2's ``imagenet_rgb256_mean`` / ``_std`` and, divided by 255, to
timm's ``IMAGENET_DEFAULT_MEAN`` / ``_STD``.
"""

__all__ = ["IMAGENET_PIXEL_MEAN", "IMAGENET_PIXEL_STD"]

IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)
