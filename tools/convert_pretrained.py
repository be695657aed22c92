#!/usr/bin/env python
"""Convert iTPN pre-trained weights to itpn_d2's key layout.

Reads an official iTPN release, an mmpretrain iTPN / HiViT or an itpn_d2 checkpoint (layout
auto-detected, or ``--source``) and writes a tensors-only ``.pth`` with ``backbone.net.*`` /
``backbone.pyramid.*`` keys that ``ITPNCheckpointer`` loads strictly. The result is checked by
loading it into an ``ITPNBackbone`` of the detected arch (and of ``--size/--layout`` if given)
before anything is written. What the conversion renames, drops, resizes and refuses:
``itpn_d2/checkpoint/convert.py``.

Prints the detected source and arch as one JSON line. Exit status 0, or 1 with an ``ERROR``
log line when the file cannot be read or converted, or is not the expected arch.

Usage::

    python tools/convert_pretrained.py itpn_pixel_base_1600e.pt itpn_base_d2.pth
    python tools/convert_pretrained.py mmpretrain_itpn_base.pth out.pth --size base --layout mmpretrain
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from itpn_d2.checkpoint import SOURCES, BackboneLoadError, ConversionError, convert_file  # noqa: E402

logger = logging.getLogger("itpn_d2.convert")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="official iTPN / mmpretrain / itpn_d2 checkpoint")
    ap.add_argument("output", help="where to write the detectron2-loadable .pth")
    ap.add_argument("--source", default="auto", choices=("auto",) + SOURCES)
    ap.add_argument("--fpn-depth", type=int, default=None, help="keep only this many C-MLPs per pyramid level")
    ap.add_argument("--pos-grid", type=int, default=14, help="position embedding grid side (224 px = 14)")
    ap.add_argument("--size", default=None, help="refuse unless the file is this HiViT size (tiny/small/base/large)")
    ap.add_argument("--layout", default="official", help="block layout for --size (official / mmpretrain)")
    ap.add_argument("--allow-unsafe", action="store_true", help="allow a full unpickling (trusted files only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        info = convert_file(
            args.input,
            args.output,
            source=args.source,
            fpn_depth=args.fpn_depth,
            pos_grid=(args.pos_grid, args.pos_grid),
            expect=(args.size, args.layout) if args.size else None,
            allow_unsafe=args.allow_unsafe or None,
        )
    except (ConversionError, BackboneLoadError, RuntimeError) as e:
        logger.error(str(e))
        return 1
    print(json.dumps({"source": info["source"], "arch": info["arch"]}, default=list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
