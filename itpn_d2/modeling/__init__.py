from .hivit import HIVIT_ARCHS, AttentionBlock, HiViT, MlpBlock, PatchEmbed, PatchMerge, hivit_arch, map_to_units, units_to_map
from .pyramid import FeaturePyramid, PatchSplit
from .backbone import ITPNBackbone
