"""ROI pooling that keeps the box coordinates in fp32 under autocast.

detectron2's ``ROIAlign`` casts the boxes to the feature map's dtype before calling
torchvision's ``roi_align``. Under bf16 autocast the features are bf16, and bf16 keeps 8
significant bits: a coordinate between 512 and 1024 px is rounded to a multiple of 4 px (601.3
becomes 600, 1010.2 becomes 1012; up to 2 px off, half a cell of the stride-4 level), and one
between 1024 and 2048 px to a multiple of 8 px, for every box of a COCO-sized detector (fp16,
detectron2's default AMP dtype on CUDA, keeps 11 bits: 0.5 px below 1024). Under autocast
torchvision's ``roi_align`` runs in fp32 whatever it is given, so the cast gains nothing:
:class:`ROIAlignFP32Boxes` skips it there and is detectron2's ``ROIAlign`` otherwise.
"""
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from torch import nn
from torchvision.ops import roi_align

__all__ = ["ROIAlignFP32Boxes", "ROIPoolerFP32Boxes"]


@torch.jit.unused
def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class ROIAlignFP32Boxes(ROIAlign):
    """detectron2's ``ROIAlign`` (same arguments), without rounding the boxes to fp16 / bf16
    features under autocast (module docstring). Scriptable, as detectron2's."""

    def forward(self, input, rois):
        """
        Args:
            input: (N, C, H, W) features.
            rois: (R, 5) boxes (batch index, x0, y0, x1, y1) in input-image pixels.
        Returns:
            (R, C, output_size[0], output_size[1]) in ``input``'s dtype.
        """
        assert rois.dim() == 2 and rois.size(1) == 5
        if input.is_quantized:
            input = input.dequantize()
        keep_fp32 = False
        if not torch.jit.is_scripting():
            keep_fp32 = input.dtype in (torch.float16, torch.bfloat16) and _autocast_on(input.device.type)
        if not keep_fp32:
            rois = rois.to(dtype=input.dtype)
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


class ROIPoolerFP32Boxes(ROIPooler):
    """detectron2's ``ROIPooler`` (same arguments) whose ``ROIAlign`` / ``ROIAlignV2`` levels are
    :class:`ROIAlignFP32Boxes`; the other pooler types never cast the boxes and are kept as
    detectron2 builds them. No parameters: checkpoints are the same as with ``ROIPooler``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.level_poolers = nn.ModuleList(
            ROIAlignFP32Boxes(p.output_size, p.spatial_scale, p.sampling_ratio, aligned=p.aligned)
            if type(p) is ROIAlign else p
            for p in self.level_poolers
        )
