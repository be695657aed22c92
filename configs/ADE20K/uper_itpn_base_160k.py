"""UPerNet + iTPN-B on ADE20K-150: 512x512 crops, 160k iterations, batch 16.

Recipe of the iTPN release (REFERENCE.md, "Segmentation"): AdamW lr 3e-5,
weight decay 0.05 (none on norms, biases and the position embedding), poly
schedule (power 1, to 0) after 1500 linear warm-up iterations, layer-wise lr
decay 0.90, drop path 0.1, sliding-window test (512 windows, stride 341).
The reference's 3e-5 is low next to BEiT's ADE20K recipes; it is kept as
released. Reported mIoU: 53.5 (pixel, 1600 ep) / 54.7 (CLIP-B).

    python tools/lazyconfig_train_net.py --config-file configs/ADE20K/uper_itpn_base_160k.py \
        train.init_checkpoint=/path/to/itpn_base_pretrained.pth
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from itpn_d2.lr_decay import hivit_lr_factor_func
from itpn_d2.modeling.slide_segmentor import SlidingWindowSemanticSegmentor

from ..common.data.ade20k import dataloader
from ..common.models.uper_itpn import model
from ..common.train_compile import train_compile

# Whole-model class swap; every argument of SemanticSegmentor carries over.
model._target_ = SlidingWindowSemanticSegmentor
model.crop_size = (512, 512)
model.stride = (341, 341)

train = model_zoo.get_config("common/train.py").train
train.compile = train_compile
train.max_iter = 160000
train.eval_period = 16000
train.checkpointer.period = 16000
train.amp.enabled = True
train.init_checkpoint = ""  # a pre-training checkpoint of this repo, or a converted release one

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 3e-5
optimizer.weight_decay = 0.05
optimizer.params.weight_decay_bias = 0.0
optimizer.params.overrides = {"absolute_pos_embed": {"weight_decay": 0.0}}
# num_layers = len(net.blocks), read from the model config so size variants need no second edit.
optimizer.params.lr_factor_func = L(hivit_lr_factor_func)(
    lr_decay_rate=0.90,
    mlp_depths="${....model.backbone.net.mlp_depths}",
    depth="${....model.backbone.net.depth}",
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(PolynomialDecayParamScheduler)(base_value=1.0, power=1.0),
    warmup_length=1500 / train.max_iter,
    warmup_method="linear",
    warmup_factor=1e-6,
)
