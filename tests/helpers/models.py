"""Tiny models and inputs shared by the tests (CPU, seconds)."""
import os

import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import BitMasks, Boxes, Instances

from itpn_d2.modeling import FeaturePyramid, HiViT, ITPNBackbone, hivit_arch
from itpn_d2.modeling.decoder import LevelDecoder, PixelDecoder
from itpn_d2.modeling.masking import BlockMaskGenerator, RandomMaskGenerator
from itpn_d2.modeling.pretrainer import MaskedPretrainer
from itpn_d2.modeling.teacher import EMATeacher

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
IMG = 64  # pre-training image side: 4x4 units
D = 64  # tiny pyramid width


def make_tiny_backbone(fpn_depth: int = 2, out_dim: int = 64, **net_kwargs) -> ITPNBackbone:
    arch = hivit_arch("tiny")
    arch.update(net_kwargs.pop("arch", {}))
    net = HiViT(**arch, **net_kwargs)
    pyramid = FeaturePyramid(embed_dim=net.embed_dim, out_dim=out_dim, depth=fpn_depth)
    return ITPNBackbone(net=net, pyramid=pyramid)


def tiny_mask_rcnn(repo_root):
    cfg = LazyConfig.load(os.path.join(repo_root, "configs/common/models/mask_rcnn_itpn.py"))
    cfg.model.backbone.net.update(hivit_arch("tiny"))
    cfg.model.backbone.net.drop_path_rate = 0.0
    cfg.model.roi_heads.num_classes = 3
    cfg.model.roi_heads.batch_size_per_image = 32
    cfg.model.proposal_generator.post_nms_topk = (64, 32)
    cfg.model.roi_heads.box_predictor.test_topk_per_image = 10
    return instantiate(cfg.model)


def mask_rcnn_sample(h, w, n=2):
    inst = Instances((h, w))
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 110.0, 90.0]])[:n]
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.tensor([0, 2])[:n]
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[i, y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(masks)
    return {"image": torch.randint(0, 255, (3, h, w)).float(), "instances": inst, "height": h, "width": w}


def tiny_pretrainer(*, mim="fused", mfm=True, mask="random", momentum=0.99, max_iter=0, fpn_depth=2, seed=0,
                    targets="encoder", target_norm="batch_token", mfm_warmup_iters=0, frozen_backbone=False):
    torch.manual_seed(seed)
    backbone = make_tiny_backbone(fpn_depth=fpn_depth, out_dim=D, pretrain_img_size=IMG)
    if frozen_backbone:
        backbone.freeze()
    if mim == "fused":
        pix = PixelDecoder(in_dim=D, dec_dim=64, depth=1, num_heads=4, pretrain_img_size=IMG)
    elif mim == "levels":
        pix = LevelDecoder(in_dim=D, dec_dim=64, depth=1, num_heads=4, pretrain_img_size=IMG)
    else:
        pix = None
    widths = backbone.net.stage_dims if targets == "encoder" else (D, D, D)
    mfm_dec = LevelDecoder(in_dim=D, out_dims=widths, dec_dim=64, depth=1, num_heads=4, pretrain_img_size=IMG)
    gen = RandomMaskGenerator() if mask == "random" else BlockMaskGenerator(min_block=2)
    return MaskedPretrainer(
        backbone=backbone,
        mask_generator=gen,
        pixel_mean=MEAN,
        pixel_std=STD,
        pixel_decoder=pix,
        mfm_decoder=mfm_dec if mfm else None,
        teacher=EMATeacher(momentum=momentum, max_iter=max_iter, targets=targets) if mfm else None,
        mim_weights=(1.0, 1.0, 1.0) if mim == "levels" else 1.0,
        mfm_target_norm=target_norm,
        mfm_warmup_iters=mfm_warmup_iters,
    )


def smooth_images(n, size=IMG, seed=0):
    """Images with structure (upsampled low-res noise), 0-255 RGB, so pixels are predictable."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 255
    return x
