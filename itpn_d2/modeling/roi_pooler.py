"""ROI pooling that keeps the box coordinates in fp32 under autocast.

detectron2's ``ROIAlign`` casts the boxes to the feature map's dtype before calling
torchvision's ``roi_align``. Under bf16 autocast the features are bf16, and bf16 keeps 8
significant bits: a coordinate between 512 and 1024 px is rounded to a multiple of 4 px (601.3
becomes 600, 1010.2 becomes 1012), a whole feature cell at stride 4, for every box of a
1024-px detector (fp16, detectron2's default AMP dtype on CUDA, keeps 11 bits: 0.5 px). Under
autocast torchvision's ``roi_align`` runs in fp32 whatever it is given, so nothing is gained
by the cast: :class:`ROIAlignFP32Boxes` skips it there and behaves as detectron2's otherwise.
"""
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from torch import nn
from torchvision.ops import roi_align

__all__ = ["ROIAlignFP32Boxes", "ROIPoolerFP32Boxes"]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class ROIAlignFP32Boxes(ROIAlign):
    """detectron2's ``ROIAlign`` (same arguments), without rounding the boxes to a low-precision
    feature dtype under autocast (module docstring)."""

    def forward(self, input, rois):
        """
        Args:
            input: (N, C, H, W) features.
            rois: (R, 5) boxes (batch index, x0, y0, x1, y1) in input-image pixels.
        Returns:
            (R, C, output_size[0], output_size[1]) in autocast's dtype under autocast, else ``input``'s.
        """
        if rois.dtype == input.dtype or input.is_quantized or not _autocast_on(input.device.type):
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


class ROIPoolerFP32Boxes(ROIPooler):
    """detectron2's ``ROIPooler`` (same arguments) whose ``ROIAlign`` / ``ROIAlignV2`` levels are
    :class:`ROIAlignFP32Boxes`; other pooler types are kept as detectron2 builds them. No
    parameters: checkpoints are the same as with ``ROIPooler``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.level_poolers = nn.ModuleList(
            ROIAlignFP32Boxes(p.output_size, p.spatial_scale, p.sampling_ratio, aligned=p.aligned)
            if type(p) is ROIAlign else p
            for p in self.level_poolers
        )
