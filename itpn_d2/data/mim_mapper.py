"""Dataset mapper for masked-image-modeling pre-training.

Turns a ``{"file_name", "image_id"}`` dict (see :mod:`itpn_d2.data.image_folder`)
into the model's input: ``{"image": (3, S, S) uint8 RGB, ...}``
after RandomResizedCrop (bicubic), horizontal flip and optional colour jitter.
Normalisation by ``pixel_mean`` / ``pixel_std`` happens in the model, on its device, as in
every detectron2 meta-architecture. uint8 (150 KB at 224 px, float32 would be 602 KB) keeps
the DataLoader's shared memory (``/dev/shm``) and the host-to-device copy 4x smaller.

A file that cannot be decoded (corrupt, truncated, empty, not an image, vanished)
never stops a run: the mapper logs one warning naming it, returns ``None`` (so
detectron2's ``MapDataset`` tries another index), and reports the number of such
skips on the next good sample as ``"skipped_images"``, which the training hook
``itpn_d2.engine.skipped_images.SkippedImagesMetric`` logs. This works unchanged in DataLoader workers: each
worker counts its own skips and hands them over with its own next sample, so
summing over the batches counts every skip exactly once.
"""
import logging
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import _apply_exif_orientation
from detectron2.utils.file_io import PathManager
from fvcore.transforms.transform import CropTransform, TransformList
from PIL import Image, ImageFile

from ..modeling.levels import UNIT_SIZE
from .skipped_files import SkippedFileCounter, printable

__all__ = ["MIMDatasetMapper", "RandomResizedCrop", "read_rgb_image"]


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _scale_16bit_to_8bit(a: np.ndarray) -> np.ndarray:
    # round(v * 255 / 65535): maps 0 -> 0 and 65535 -> 255, keeps the whole range
    # (PIL's own convert("RGB") clips 16-bit values at 255 instead).
    a = np.clip(a.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


_float_noted = False


def _float_to_8bit(a: np.ndarray, file_name: str) -> np.ndarray:
    # A float image in [0, 1] (the usual convention) maps to 0..255; any other range is
    # stretched from its min..max. Clipping to 0..255 instead would turn [0, 1] data black.
    global _float_noted
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    if not _float_noted:  # once per process: a dataset of float images would repeat it per file
        _float_noted = True
        logging.getLogger(__name__).info(
            printable(f"Float image '{file_name}': values {lo:g}..{hi:g} scaled to 0..255 (noted once per process)")
        )
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_rgb_image(file_name: str) -> np.ndarray:
    """
    Decode an image file into an RGB uint8 array, whatever its mode.

    EXIF orientation is applied as in ``detectron2.data.detection_utils.read_image``.
    Grayscale, palette, CMYK and RGBA/LA (alpha dropped) become RGB; 16-bit grayscale
    is scaled to 8 bits over its full range (16-bit RGB PNGs are already reduced to
    their high byte by PIL); 32-bit float grayscale (e.g. a float TIFF) is scaled from
    [0, 1], or from its own min..max outside [0, 1] (noted once per process in the log).
    Truncated files raise, even where another library has set PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES = True``: they are never half-loaded.

    Returns:
        np.ndarray: (H, W, 3) uint8.

    Raises:
        Any decoding error (OSError, SyntaxError, ValueError, ...).
    """
    # Some libraries set PIL's global LOAD_TRUNCATED_IMAGES = True, which makes PIL pad a
    # truncated file with grey instead of raising: force strict decoding for this read.
    prev = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode fully inside the open file; truncation raises here
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = prev
    image = _apply_exif_orientation(image)
    if image.mode == "F":  # 32-bit float (e.g. a float TIFF): scaled by its range, not clipped at 0/1
        return np.ascontiguousarray(np.repeat(_float_to_8bit(np.asarray(image), file_name)[:, :, None], 3, axis=2))
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        a = np.asarray(image)
        if image.mode in _SIXTEEN_BIT_MODES or (a.size and a.max() > 255):
            a = _scale_16bit_to_8bit(a)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image).copy()


class RandomResizedCrop(T.Augmentation):
    """
    torchvision's RandomResizedCrop as a detectron2 Augmentation: crop a random
    region of ``scale`` x the image area and aspect ratio in ``ratio`` (log-uniform),
    then resize it to ``size``. After 10 failed draws, a centre crop with the ratio
    clamped to ``ratio`` is used (same fallback as torchvision).
    """

    def __init__(
        self,
        size,
        scale: Tuple[float, float] = (0.2, 1.0),
        ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        interp=Image.BICUBIC,
    ):
        """
        Args:
            size (int or (h, w)): output size.
            scale: range of the crop area as a fraction of the image area.
            ratio: range of the crop's width / height.
            interp: PIL interpolation for the resize.
        """
        super().__init__()
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if not (scale[0] <= scale[1] and ratio[0] <= ratio[1]):
            raise ValueError(f"RandomResizedCrop: scale {scale} and ratio {ratio} must be (min, max)")
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        crop = None
        for _ in range(10):
            target_area = area * np.random.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(np.random.uniform(log_ratio[0], log_ratio[1]))
            cw = int(round(math.sqrt(target_area * aspect)))
            ch = int(round(math.sqrt(target_area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                y0 = np.random.randint(0, h - ch + 1)
                x0 = np.random.randint(0, w - cw + 1)
                crop = (x0, y0, cw, ch)
                break
        if crop is None:
            in_ratio = w / h
            if in_ratio < self.ratio[0]:
                cw, ch = w, int(round(w / self.ratio[0]))
            elif in_ratio > self.ratio[1]:
                cw, ch = int(round(h * self.ratio[1])), h
            else:
                cw, ch = w, h
            cw, ch = max(1, min(cw, w)), max(1, min(ch, h))
            crop = ((w - cw) // 2, (h - ch) // 2, cw, ch)
        x0, y0, cw, ch = crop
        return TransformList(
            [
                CropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h),
                T.ResizeTransform(ch, cw, self.size[0], self.size[1], interp=self.interp),
            ]
        )


class MIMDatasetMapper(SkippedFileCounter):
    """
    Map an unlabelled image dict to a pre-training sample.

    Output dict: the input's keys plus
      - "image": (3, S, S) uint8 tensor, RGB;
      - "height", "width": S, S (the sample's size, as detectron2 models expect);
      - "skipped_images": int, how many unreadable files this process skipped since
        its previous good sample.
    Returns ``None`` for an unreadable file (``MapDataset`` then retries another index).
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip_prob: float = 0.5,
        color_jitter: float = 0.0,
        augmentations: Optional[List[T.Augmentation]] = None,
    ):
        """
        Args:
            image_size: side of the square output crop; a multiple of the 16-pixel mask unit.
            scale, ratio: RandomResizedCrop ranges (paper: (0.2, 1.0), (3/4, 4/3)).
            hflip_prob: probability of a horizontal flip (0 disables it).
            color_jitter: brightness/contrast/saturation jitter strength as in
                torchvision's ColorJitter (0 = off; the CLIP-teacher recipe uses 0.4).
            augmentations: replaces the crop + flip pipeline entirely when given
                (its output must still be image_size x image_size).
        """
        if image_size % UNIT_SIZE != 0:
            raise ValueError(
                f"MIMDatasetMapper: image_size={image_size} must be a multiple of the {UNIT_SIZE}-pixel mask unit"
            )
        self.image_size = int(image_size)
        if augmentations is None:
            augmentations = [RandomResizedCrop(self.image_size, scale=tuple(scale), ratio=tuple(ratio))]
            if hflip_prob > 0:
                augmentations.append(T.RandomFlip(prob=hflip_prob, horizontal=True, vertical=False))
        self.augmentations = T.AugmentationList(augmentations)
        self.color_jitter = float(color_jitter)
        self._jitter = None
        if self.color_jitter > 0:
            from torchvision.transforms import v2

            cj = self.color_jitter
            self._jitter = v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj)

        self._init_skip_counter()

    def __repr__(self):
        return (
            f"MIMDatasetMapper(image_size={self.image_size}, augmentations={self.augmentations}, "
            f"color_jitter={self.color_jitter})"
        )

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        dataset_dict = dict(dataset_dict)  # the dataset's dicts are shared: never modify them
        file_name = dataset_dict["file_name"]
        try:
            image = read_rgb_image(file_name)
        except Exception as e:  # decoders raise a zoo of types; only decoding is in this try
            self._skip(file_name, e)
            return None

        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"MIMDatasetMapper: augmentations produced a {h}x{w} image from '{file_name}', "
                f"expected {self.image_size}x{self.image_size}"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self._jitter is not None:
            tensor = self._jitter(tensor)
        dataset_dict["image"] = tensor  # uint8 (ColorJitter on uint8 returns uint8)
        dataset_dict["height"], dataset_dict["width"] = h, w
        self._hand_over_skips(dataset_dict)
        return dataset_dict
