"""iTPN-B pixel pre-training (MIM only), the release's recipe: HiViT-B 3/3/24 + pyramid
depth 2 + 8-block pixel decoder, mask 0.75, 800 epochs on ImageNet-1k at batch 4096,
blr 1.5e-4 (lr 2.4e-3), 40 warm-up epochs, AMP.

    python tools/lazyconfig_train_net.py --config-file configs/pretrain/mim_itpn_base_800ep.py
"""
from detectron2 import model_zoo

from ..common.data.pretrain_folder import dataloader
from ..common.models.pretrain_itpn import model
from ..common.pretrain_schedule import lr_multiplier, optimizer, set_schedule
from ..common.train_compile import train_compile

train = model_zoo.get_config("common/train.py").train
train.compile = train_compile
train.amp.enabled = True
train.output_dir = "./output/pretrain/mim_itpn_base_800ep"
train.checkpointer.period = 10000
train.eval_period = 0  # no evaluation during pre-training
train.log_period = 20

dataloader.train.dataset.names = "imagenet_train_unlabeled"
dataloader.train.total_batch_size = 4096
dataloader.train.mapper.image_size = 224
dataloader.train.num_workers = 10

IMAGENET_TRAIN_IMAGES = 1281167
set_schedule(
    optimizer, lr_multiplier, train, model=model,
    blr=1.5e-4, epochs=800, warmup_epochs=40, images_per_epoch=IMAGENET_TRAIN_IMAGES,
)
