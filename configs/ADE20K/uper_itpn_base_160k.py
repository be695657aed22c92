"""UPerNet + iTPN-B on ADE20K-150, the release's recipe: 512x512 crops, 160k iterations at 16 images.

As sunsmarterjie/iTPN ``seg/configs/itpn/pixel_upernet_itpn_base_12_512_slide_160k_ade20k_pt2ft.py``
(with ``seg/configs/_base_/datasets/ade20k.py`` and ``schedules/schedule_160k.py``):

* model: HiViT-B 3/3/24, pyramid depth 2, relative position bias on (``rpe=True``: a table per
  attention block for the 32x32 grid of a 512 crop, zero-initialised; new on top of a pixel
  checkpoint, see ``train.new_by_design_keys``), drop path 0.1; UPerHead 768 channels on
  concat(pyramid, encoder) levels 384/512/768/768, pool scales 1/2/3/6, SyncBN; auxiliary FCN
  head on stride 16, weight 0.4; sliding-window test, 512 windows at stride 341.
* optimizer: ``configs/common/optim.py`` (AdamW, betas (0.9, 0.999), wd 0.05, the fused kernel)
  at lr 3e-5 for 16 images, layer decay 0.90 with the release's segmentation constructor (rule
  ``release_seg``: per-layer rate ``0.90 ** (13 / 32)``, so the patch embedding trains at 0.27 of
  the lr, the last block at 1.04; weight decay on everything but 1-D tensors (norms, layer-scale)
  and biases, as that constructor: the relative position tables are decayed, as released).
* schedule: poly (power 1, to 0) per iteration after 1500 linear warm-up iterations from 1e-6x;
  evaluation and checkpoint every 16k iterations; AMP.
* data: ``configs/common/data/ade20k.py`` (resize 0.5-2.0, 512 crop with at most 75 % of one
  class, flip, mmseg's PhotoMetricDistortion).

The schedule is per image (``itpn_d2.schedule``): ``dataloader.train.total_batch_size=8`` halves
the lr and doubles the iterations, warm-up and periods. The release's 3e-5 is low next to BEiT's
ADE20K recipes; it is kept as released. Reported mIoU: 53.5 (pixel, 1600 ep) / 54.7 (CLIP-B).

    python tools/lazyconfig_train_net.py --config-file configs/ADE20K/uper_itpn_base_160k.py \
        train.init_checkpoint=/path/to/itpn_base_pretrained.pth
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from itpn_d2.modeling.slide_segmentor import SlidingWindowSemanticSegmentor
from itpn_d2.schedule import iters_for_images, lr_at_batch, poly_lr_multiplier

from ..common.data.ade20k import dataloader
from ..common.models.uper_itpn import model
from ..common.optim import AdamW as optimizer
from ..common.train_compile import train_compile

RELEASE_BATCH = 16  # 8 GPUs x samples_per_gpu=2
CROP = 512

# Whole-model class swap; every argument of SemanticSegmentor carries over.
model._target_ = SlidingWindowSemanticSegmentor
model.crop_size = (CROP, CROP)
model.stride = (341, 341)
model.backbone.net.rel_pos = True
model.backbone.rel_pos_grid = CROP // 16  # the release: Hp = img_size / 16 with img_size=512

train = model_zoo.get_config("common/train.py").train
train.compile = train_compile
train.amp.enabled = True
train.init_checkpoint = ""  # a pre-training checkpoint of this repo, or a converted release one
train.backbone_load = "strict"
# absent from a pixel pre-training checkpoint; every other missing backbone tensor is still an error
train.new_by_design_keys = ["backbone.net.blocks.*.attn.relative_position_bias_table"]
train.max_iter = iters_for_images(160000 * RELEASE_BATCH)
train.eval_period = iters_for_images(16000 * RELEASE_BATCH)
train.checkpointer.period = iters_for_images(16000 * RELEASE_BATCH)

# the common AdamW with the release's segmentation constructor in place of its detection one
optimizer.lr = lr_at_batch(3e-5, RELEASE_BATCH)
optimizer.params.lr_factor_func.rule = "release_seg"
optimizer.params.lr_factor_func.lr_decay_rate = 0.90
optimizer.params.no_weight_decay = "release_seg"

lr_multiplier = L(poly_lr_multiplier)(
    max_iter="${train.max_iter}",
    warmup_iters=iters_for_images(1500 * RELEASE_BATCH),
    power=1.0,
    warmup_factor=1e-6,
)
