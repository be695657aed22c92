#!/usr/bin/env python
"""Parameters and FLOPs of an iTPN model, per part.

FLOPs as every tool of this repository counts them (``itpn_d2/utils/flops.py``): 2 FLOPs per
multiply-add, matmuls, convolutions and attention included (fvcore's counters give half).
Parameters are fvcore's ``parameter_count`` (the counting: ``itpn_d2/utils/model_size.py``). Examples::

    # encoder + pyramid of a named size and block layout, FLOPs at 224x224 unmasked
    python tools/analyze_model.py --size base --layout mmpretrain --fpn-depth 2
    # any LazyConfig model: parameters per sub-module, two levels deep
    python tools/analyze_model.py --config-file configs/COCO/mask_rcnn_itpn_base_1x.py --depth 2 \
        --opts model.backbone.net.depth=12
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from itpn_d2.config import add_opts_argument, load_config  # noqa: E402
from itpn_d2.utils.model_size import backbone_flops, backbone_parts, format_millions, param_table  # noqa: E402


def analyze_arch(args) -> None:
    arch, parts = backbone_parts(
        size=args.size, layout=args.layout, fpn_dim=args.fpn_dim, fpn_depth=args.fpn_depth,
        decoder_depth=args.decoder_depth,
    )
    print(f"HiViT {args.size} ({args.layout} layout): {arch}")
    total = 0
    for name, module in parts.items():
        n = sum(p.numel() for p in module.parameters())
        total += n
        print(f"  params  {name:<32s} {format_millions(n):>10s}")
    print(f"  params  {'total':<32s} {format_millions(total):>10s}")

    net, pyramid = list(parts.values())[:2]
    enc, pyr = backbone_flops(net, pyramid, args.input_size)
    print(f"  FLOPs   encoder at {args.input_size}x{args.input_size}, unmasked   {enc / 1e9:.2f}G")
    print(f"  FLOPs   pyramid at {args.input_size}x{args.input_size}, unmasked   {pyr / 1e9:.2f}G")


def analyze_config(args) -> None:
    from detectron2.config import instantiate

    cfg = load_config(args.config_file, args.opts)
    model = instantiate(cfg.model).eval()
    print(f"{args.config_file}: parameters per part")
    for name, n in param_table(model, args.depth):
        print(f"  {name:<48s} {format_millions(n):>10s}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", help="a LazyConfig; counts cfg.model per sub-module")
    p.add_argument("--depth", type=int, default=2, help="module depth of the per-part table (--config-file)")
    p.add_argument("--size", default="base", help="tiny | small | base | large")
    p.add_argument("--layout", default="official", help="official | mmpretrain")
    p.add_argument("--fpn-dim", type=int, default=256)
    p.add_argument("--fpn-depth", type=int, default=2)
    p.add_argument("--decoder-depth", type=int, default=0, help="also count a pixel decoder of this depth")
    p.add_argument("--input-size", type=int, default=224)
    add_opts_argument(p)  # with --config-file
    args = p.parse_args(argv)
    if args.config_file:
        analyze_config(args)
    else:
        analyze_arch(args)


if __name__ == "__main__":
    main()
