"""UPerNet + iTPN-L on ADE20K-150: the base config with the large encoder (official 2/2/40
layout, C=768: UPerNet levels 448/640/1024/1024), drop path 0.2 and layer decay 0.95 over
``num_layers=44`` (+2 = 46 = ``len(blocks)``), as sunsmarterjie/iTPN
``seg/configs/itpn/pixel_upernet_itpn_large_12_512_slide_160k_ade20k_pt2ft.py``; relative position
bias on, zero-initialised, as the base. Reported mIoU: 56.1 (pixel) / 57.7 (CLIP-L)."""

from itpn_d2.modeling.hivit import hivit_arch

from .uper_itpn_base_160k import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.update(hivit_arch("large", "official"))
model.backbone.net.drop_path_rate = 0.2
model.backbone.net.use_act_checkpoint = True  # 40 global-attention blocks on 512x512 crops
optimizer.params.lr_factor_func.lr_decay_rate = 0.95
