"""Registers the generated dataset (:mod:`itpn_d2.data.synthetic`) with detectron2.

Names (``prefix`` defaults to "itpn_synthetic"):

================================  ==========================================  ================
name                              dicts                                       evaluator_type
================================  ==========================================  ================
``{prefix}_train`` / ``_val``     COCO instances (RLE masks, ``bbox_mode``    "coco"
                                  XYWH_ABS, ``category_id`` 0..K-1)
``{prefix}_sem_seg_train``/_val`` ``file_name``, ``sem_seg_file_name``         "sem_seg"
                                  (0 = background, 1..K, 255 = ignore)
``{prefix}_unlabeled``            ``file_name`` only, for pre-training         --
================================  ==========================================  ================

Registration is cheap: only names and metadata (``thing_classes``, ``stuff_classes``, paths,
``evaluator_type``) are set. The images are generated the first time any of these datasets is
requested through ``DatasetCatalog.get`` (or by :func:`ensure_registered_synthetic`), and reused from
the cache afterwards.

Default root: ``$ITPN_SYNTHETIC_ROOT`` if set, else ``$DETECTRON2_DATASETS/itpn_synthetic``, else
``./datasets/itpn_synthetic`` (relative to the working directory at registration, like detectron2's
own builtin datasets). It is made absolute when registered.

Instance masks are RLE (rings have holes), so build ``DatasetMapper`` with
``instance_mask_format="bitmask"``; the metadata carries ``mask_format="bitmask"`` as a reminder.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .synthetic import CATEGORIES, SEM_SEG_IGNORE, SyntheticSpec, ensure_synthetic, image_file_name, sem_seg_file_name, split_paths, stuff_classes

__all__ = ["default_synthetic_root", "register_synthetic", "ensure_registered_synthetic", "synthetic_dataset_names"]

DEFAULT_PREFIX = "itpn_synthetic"


def default_synthetic_root() -> str:
    """``$ITPN_SYNTHETIC_ROOT``, else ``$DETECTRON2_DATASETS/itpn_synthetic``, else ``datasets/itpn_synthetic``."""
    if os.environ.get("ITPN_SYNTHETIC_ROOT"):
        return os.environ["ITPN_SYNTHETIC_ROOT"]
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "itpn_synthetic")


def synthetic_dataset_names(prefix: str = DEFAULT_PREFIX) -> Dict[str, str]:
    """Map from role to registered name, e.g. ``{"train": "itpn_synthetic_train", ...}``."""
    return {
        "train": f"{prefix}_train",
        "val": f"{prefix}_val",
        "sem_seg_train": f"{prefix}_sem_seg_train",
        "sem_seg_val": f"{prefix}_sem_seg_val",
        "unlabeled": f"{prefix}_unlabeled",
    }


def _thing_colors() -> List[List[int]]:
    # evenly spaced saturated hues: one recognisable colour per category in visualisations
    hsv = np.array([[[int(180 * i / len(CATEGORIES)), 220, 255] for i in range(len(CATEGORIES))]], dtype=np.uint8)
    return [[int(c) for c in rgb] for rgb in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]]


def _load_instances(root: str, spec: SyntheticSpec, split: str, name: str) -> List[Dict]:
    ensure_synthetic(root, spec)
    paths = split_paths(root, split)
    return load_coco_json(paths["json_file"], paths["image_root"], name)


def _load_sem_seg(root: str, spec: SyntheticSpec, split: str) -> List[Dict]:
    ensure_synthetic(root, spec)
    paths = split_paths(root, split)
    return [
        {
            "file_name": os.path.join(paths["image_root"], image_file_name(i, spec)),
            "sem_seg_file_name": os.path.join(paths["sem_seg_root"], sem_seg_file_name(i)),
            "height": spec.image_size,
            "width": spec.image_size,
            "image_id": i + 1,
        }
        for i in range(spec.num_images(split))
    ]


def _load_unlabeled(root: str, spec: SyntheticSpec) -> List[Dict]:
    ensure_synthetic(root, spec)
    # With num_unlabeled=0 the train images (without their labels) stand in.
    split = "unlabeled" if spec.num_unlabeled > 0 else "train"
    image_root = split_paths(root, split)["image_root"]
    return [
        {
            "file_name": os.path.join(image_root, image_file_name(i, spec)),
            "height": spec.image_size,
            "width": spec.image_size,
            "image_id": i + 1,
        }
        for i in range(spec.num_images(split))
    ]


def _register(name: str, loader, metadata: Dict) -> None:
    if name in DatasetCatalog.list():
        old = MetadataCatalog.get(name)
        if not hasattr(old, "synthetic_spec"):
            raise ValueError(f"dataset {name!r} is already registered by someone else; pick another prefix")
        if old.synthetic_root == metadata["synthetic_root"] and old.synthetic_spec == metadata["synthetic_spec"]:
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_synthetic(root: Optional[str] = None, *, prefix: str = DEFAULT_PREFIX, **gen_kwargs) -> Dict[str, str]:
    """Register the generated dataset's five names (see the module docstring); generates nothing.

    Args:
        root: where the data is (or will be) generated; default :func:`default_synthetic_root`.
        prefix: name prefix.
        gen_kwargs: :class:`~itpn_d2.data.synthetic.SyntheticSpec` fields (validated now).

    Calling again with the same arguments does nothing; with different ones it replaces the
    registration (e.g. a test or the demo switching to smaller data).

    Returns:
        the names, as :func:`synthetic_dataset_names`.
    """
    spec = SyntheticSpec(**gen_kwargs)
    root = os.path.abspath(os.path.expanduser(root if root is not None else default_synthetic_root()))
    names = synthetic_dataset_names(prefix)
    common = {"synthetic_root": root, "synthetic_spec": spec.to_dict()}
    things = list(CATEGORIES)
    thing_colors = _thing_colors()
    for split in ("train", "val"):
        paths = split_paths(root, split)
        _register(
            names[split],
            functools.partial(_load_instances, root, spec, split, names[split]),
            dict(
                common,
                json_file=paths["json_file"],
                image_root=paths["image_root"],
                evaluator_type="coco",
                thing_classes=things,
                thing_colors=thing_colors,
                thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(things))},
                mask_format="bitmask",
            ),
        )
        _register(
            names[f"sem_seg_{split}"],
            functools.partial(_load_sem_seg, root, spec, split),
            dict(
                common,
                image_root=paths["image_root"],
                sem_seg_root=paths["sem_seg_root"],
                evaluator_type="sem_seg",
                stuff_classes=stuff_classes(),
                stuff_colors=[[0, 0, 0]] + thing_colors,
                ignore_label=SEM_SEG_IGNORE,
                background_label=0,  # renderings leave it undrawn (itpn_d2.utils.predictor)
            ),
        )
    _register(
        names["unlabeled"],
        functools.partial(_load_unlabeled, root, spec),
        dict(common, image_root=split_paths(root, "unlabeled" if spec.num_unlabeled > 0 else "train")["image_root"]),
    )
    return names


def ensure_registered_synthetic(name: str) -> Dict:
    """Generate (or reuse) the data behind registered name ``name`` now, e.g. before building an
    evaluator that opens ``json_file``. Returns :func:`ensure_synthetic`'s report."""
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "synthetic_spec"):
        raise KeyError(f"{name!r} is not a registered itpn_synthetic dataset")
    return ensure_synthetic(meta.synthetic_root, SyntheticSpec(**meta.synthetic_spec))


def _register_default() -> None:
    """Default names at the default root. If data was already generated there (e.g. by
    ``datasets/generate_synthetic.py`` with other sizes), adopt its arguments instead of
    regenerating it with the defaults."""
    from .synthetic import GENERATOR_VERSION, read_manifest

    manifest = read_manifest(default_synthetic_root())
    if manifest and manifest.get("version") == GENERATOR_VERSION and isinstance(manifest.get("spec"), dict):
        try:
            register_synthetic(**manifest["spec"])
            return
        except (TypeError, ValueError):
            pass  # a manifest from another layout: fall back to the defaults (regenerated on use)
    register_synthetic()


# Register the default names on import, like detectron2.data.datasets.builtin (cheap: no generation).
if __name__.endswith(".builtin"):
    _register_default()
