"""SemanticSegmentor with sliding-window inference (mmseg's ``mode="slide"``).

The iTPN ADE20K numbers are measured with 512x512 windows at stride 341 over the
test image (short side 512): every window is run separately, logits of
overlapping windows are averaged. Training is unchanged.
"""

from typing import Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

__all__ = ["SlidingWindowSemanticSegmentor"]


def _windows(length: int, crop: int, stride: int):
    """Start offsets covering [0, length) with windows of ``crop`` (the last one flush with the end)."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(n)})


@META_ARCH_REGISTRY.register()
class SlidingWindowSemanticSegmentor(SemanticSegmentor):
    """``SemanticSegmentor`` whose inference averages logits over overlapping windows.

    With ``crop_size=None`` inference is the whole-image inference of the parent class.
    """

    @configurable
    def __init__(
        self,
        *,
        crop_size: Optional[Tuple[int, int]] = (512, 512),
        stride: Tuple[int, int] = (341, 341),
        **kwargs,
    ):
        """
        Args:
            crop_size: (h, w) of a window, or None for whole-image inference.
            stride: (h, w) step between windows.
            kwargs: :class:`SemanticSegmentor` arguments.
        """
        super().__init__(**kwargs)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.stride = tuple(stride)

    def forward(self, batched_inputs):
        if self.training or self.crop_size is None:
            return super().forward(batched_inputs)
        results = []
        for x in batched_inputs:
            image = (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
            logits = self.slide_logits(image)
            height = x.get("height", image.shape[-2])
            width = x.get("width", image.shape[-1])
            results.append({"sem_seg": sem_seg_postprocess(logits, image.shape[-2:], height, width)})
        return results

    @torch.no_grad()
    def slide_logits(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) normalised image -> (K, H, W) logits averaged over windows."""
        H, W = image.shape[-2:]
        ch, cw = min(self.crop_size[0], H), min(self.crop_size[1], W)
        total, count = None, image.new_zeros((1, H, W))
        for y in _windows(H, ch, self.stride[0]):
            for x in _windows(W, cw, self.stride[1]):
                crop = ImageList.from_tensors(
                    [image[:, y : y + ch, x : x + cw]],
                    self.backbone.size_divisibility,
                    padding_constraints=self.backbone.padding_constraints,
                )
                logits, _ = self.sem_seg_head(self.backbone(crop.tensor), None)
                logits = logits[0, :, :ch, :cw]
                if total is None:
                    total = image.new_zeros((logits.shape[0], H, W))
                total[:, y : y + ch, x : x + cw] += logits
                count[:, y : y + ch, x : x + cw] += 1
        return total / count
