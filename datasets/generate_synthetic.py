#!/usr/bin/env python
"""Generate (or reuse) the built-in synthetic instance/semantic-segmentation dataset.

    python datasets/generate_synthetic.py --root datasets/itpn_synthetic --num-train 400 --num-val 50 --size 256 --seed 0

The output is cached: running it again with the same arguments reuses the folder; other arguments
regenerate it. See itpn_d2/data/synthetic.py for the layout and label conventions.
"""
import argparse
import logging
import os
import sys

try:
    from itpn_d2.data.synthetic import SyntheticSpec, ensure_synthetic
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from itpn_d2.data.synthetic import SyntheticSpec, ensure_synthetic


def main(argv=None) -> int:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="output folder (default: the registered default root, "
                        "$ITPN_SYNTHETIC_ROOT or $DETECTRON2_DATASETS/itpn_synthetic or datasets/itpn_synthetic)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument("--num-unlabeled", type=int, default=defaults.num_unlabeled, help="extra images for pre-training")
    parser.add_argument("--size", type=int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument("--min-objects", type=int, default=defaults.min_objects)
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--format", choices=("jpg", "png"), default=defaults.image_format)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.root is None:
        from itpn_d2.data.builtin import default_synthetic_root

        args.root = default_synthetic_root()
    try:
        spec = SyntheticSpec(
            num_train=args.num_train,
            num_val=args.num_val,
            num_unlabeled=args.num_unlabeled,
            image_size=args.size,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            seed=args.seed,
            image_format=args.format,
        )
    except ValueError as e:
        parser.error(str(e))
    report = ensure_synthetic(args.root, spec)
    root = report["root"]
    if report["reused"]:
        print(f"Reused the cached dataset at {root} (manifest matches; nothing written).")
    else:
        print(f"Wrote the dataset to {root} in {report['seconds']:.1f}s.")
    for split in ("train", "val", "unlabeled"):
        counts = report["counts"][split]
        line = f"  {split:9s}: {counts['images']} images"
        if split != "unlabeled":
            line += f", {counts['annotations']} instances -> {os.path.join(root, 'annotations', f'instances_{split}.json')}"
        print(line)
    print(f"  manifest : {os.path.join(root, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
