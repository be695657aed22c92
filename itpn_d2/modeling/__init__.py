from .hivit import HIVIT_ARCHS, AttentionBlock, HiViT, MlpBlock, PatchEmbed, PatchMerge, hivit_arch, map_to_units, units_to_map
from .pyramid import FeaturePyramid, PatchSplit
from .backbone import ITPNBackbone
from .seg_backbone import ITPNSegBackbone, itpn_seg_output_shape
from .uper_head import UPerHead
from .slide_segmentor import SlidingWindowSemanticSegmentor
from .masking import BlockMaskGenerator, RandomMaskGenerator
from .decoder import LevelDecoder, PixelDecoder
from .teacher import EMATeacher, ExternalTeacher
from .pretrainer import MaskedPretrainer
