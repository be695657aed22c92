"""mmseg's ``PhotoMetricDistortion`` as a detectron2 augmentation.

The iTPN ADE20K recipe (sunsmarterjie/iTPN ``seg/configs/_base_/datasets/ade20k.py``) distorts
every training crop with mmseg's ``PhotoMetricDistortion``. detectron2's ``RandomBrightness`` /
``RandomContrast`` / ``RandomSaturation`` are multiplicative blends and it has no hue jitter, so
this is the mmseg operation itself, expressed as a detectron2 ``Augmentation`` whose transform
is a ``ColorTransform`` (image only; boxes, masks and the label map are left as they are). Each
step is applied with probability 1/2, in mmseg's order:

1. brightness: ``img + delta``, delta ~ U(-32, 32);
2. contrast ``img * alpha``, alpha ~ U(0.5, 1.5), here or after step 4 (a coin decides);
3. saturation: HSV ``S * alpha``, alpha ~ U(0.5, 1.5);
4. hue: HSV ``(H + delta) mod 180``, integer delta ~ U[-18, 18) (OpenCV's 0-180 hue scale).

Every step clips to 0..255 and rounds to uint8, as mmseg's ``convert``.
"""
from typing import Optional, Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T

__all__ = ["PhotoMetricDistortion"]


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion(T.Augmentation):
    """Random brightness, contrast, saturation and hue, as mmseg's ``PhotoMetricDistortion``.

    Args:
        brightness_delta: max absolute additive brightness change (mmseg: 32).
        contrast_range: multiplicative contrast range (mmseg: (0.5, 1.5)).
        saturation_range: multiplicative HSV saturation range (mmseg: (0.5, 1.5)).
        hue_delta: max absolute hue shift on OpenCV's 0-180 scale (mmseg: 18).
        image_format: "RGB" or "BGR", the channel order of the images the mapper reads
            (HSV conversions need it; mmseg works on BGR).
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Tuple[float, float] = (0.5, 1.5),
        saturation_range: Tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        image_format: str = "RGB",
    ):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"PhotoMetricDistortion image_format must be 'RGB' or 'BGR', got {image_format!r}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"PhotoMetricDistortion expects a HxWx3 uint8 image, got {image.dtype} of shape {image.shape}"
            )
        rng = np.random
        brightness: Optional[float] = (
            rng.uniform(-self.brightness_delta, self.brightness_delta) if rng.randint(2) else None
        )
        contrast_first = bool(rng.randint(2))
        contrast: Optional[float] = rng.uniform(*self.contrast_range) if rng.randint(2) else None
        saturation: Optional[float] = rng.uniform(*self.saturation_range) if rng.randint(2) else None
        hue: Optional[int] = int(rng.randint(-self.hue_delta, self.hue_delta)) if rng.randint(2) else None
        to_hsv, from_hsv = (
            (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB) if self.image_format == "RGB" else (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR)
        )

        def op(img: np.ndarray) -> np.ndarray:
            if brightness is not None:
                img = _convert(img, beta=brightness)
            if contrast_first and contrast is not None:
                img = _convert(img, alpha=contrast)
            if saturation is not None or hue is not None:
                hsv = cv2.cvtColor(img, to_hsv)
                if saturation is not None:
                    hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=saturation)
                if hue is not None:
                    hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int32) + hue) % 180).astype(np.uint8)
                img = cv2.cvtColor(hsv, from_hsv)
            if not contrast_first and contrast is not None:
                img = _convert(img, alpha=contrast)
            return img

        return T.ColorTransform(op)
