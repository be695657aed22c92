from .levels import LEVEL_NAMES, PYRAMID_LEVELS, UNIT_SIZE, PyramidLevel
from .layers import Attention, AttentionBlock, MlpBlock, init_weights, layer_norm
from .unit_layout import map_to_units, patchify_units, units_to_map
from .hivit import HIVIT_ARCHS, HiViT, PatchEmbed, PatchMerge, hivit_arch
from .pyramid import FeaturePyramid, PatchSplit
from .backbone import ITPNBackbone, UnitFeatures
from .seg_backbone import ITPNSegBackbone, itpn_seg_output_shape
from .uper_head import UPerHead
from .slide_segmentor import SlidingWindowSemanticSegmentor
from .masking import BlockMaskGenerator, RandomMaskGenerator
from .roi_pooler import ROIAlignFP32Boxes, ROIPoolerFP32Boxes
from .decoder import LevelDecoder, PixelDecoder
from .teacher import EMATeacher, ExternalTeacher
from .pretrainer import MaskedPretrainer
