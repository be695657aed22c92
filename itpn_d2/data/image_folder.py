"""Unlabelled image folders as detectron2 datasets (for pre-training).

A folder tree of images (ImageNet's ``train/<class>/<img>.JPEG`` layout or any
other tree) becomes a detectron2 dataset whose dicts carry only
``{"file_name", "image_id"}``: no labels are read, so class sub-folders are just
folders. Registration is lazy: nothing touches the disk until
``DatasetCatalog.get(name)`` is called (i.e. when a data loader is built).
"""
import logging
import os
from typing import Iterable, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_image_folder",
    "register_image_folder",
    "register_all_unlabeled_folders",
    "BUILTIN_UNLABELED_FOLDERS",
]

logger = logging.getLogger(__name__)

# Lower-case; matched case-insensitively (ImageNet uses ".JPEG").
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _normalize_extensions(extensions: Iterable[str]) -> tuple:
    exts = []
    for e in extensions:
        e = e.lower()
        exts.append(e if e.startswith(".") else "." + e)
    return tuple(exts)


def load_image_folder(root: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> List[dict]:
    """
    List every image file under ``root``, recursively, in a deterministic order.

    Args:
        root: folder to scan; symbolic links to folders are followed.
        extensions: file-name suffixes counted as images (case-insensitive).
            Hidden files (name starting with ".", e.g. macOS ``._x.jpg``) are ignored.

    Returns:
        list[dict]: ``{"file_name": absolute path, "image_id": index}``, sorted by
        path relative to ``root``. Files are not opened here: a file that is not a
        decodable image is skipped later, by the mapper, with a warning.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        RuntimeError: ``root`` holds no file with one of ``extensions``.
    """
    exts = _normalize_extensions(extensions)
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder '{root}' does not exist or is not a directory. "
            "Put the images there (any tree of image files, e.g. ImageNet's train/<class>/*.JPEG), "
            "or set $DETECTRON2_DATASETS to the folder holding it."
        )
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            if f.lower().endswith(exts):
                rel_paths.append(os.path.relpath(os.path.join(dirpath, f), root))
    if not rel_paths:
        raise RuntimeError(
            f"Image folder '{root}' contains no image files (looked for extensions {list(exts)})."
        )
    # Sort the relative paths as a whole so the order does not depend on os.walk's order.
    rel_paths.sort()
    return [{"file_name": os.path.join(root, p), "image_id": i} for i, p in enumerate(rel_paths)]


def register_image_folder(
    name: str, root: str, extensions: Iterable[str] = IMAGE_EXTENSIONS, **metadata
) -> None:
    """
    Register the images under ``root`` as the label-free dataset ``name``.

    The folder is scanned only when ``DatasetCatalog.get(name)`` runs, so this is
    cheap to call at import time and the folder may be created afterwards. A missing
    or empty folder is reported then, naming the folder.

    Args:
        name: dataset name, e.g. "imagenet_train_unlabeled".
        root: folder of images.
        extensions: see :func:`load_image_folder`.
        metadata: extra key-values for ``MetadataCatalog.get(name)``.
    """
    exts = _normalize_extensions(extensions)
    DatasetCatalog.register(name, lambda: load_image_folder(root, exts))
    MetadataCatalog.get(name).set(
        image_root=os.path.abspath(os.path.expanduser(root)), evaluator_type=None, **metadata
    )


# name -> folder relative to the datasets root (detectron2's $DETECTRON2_DATASETS convention).
BUILTIN_UNLABELED_FOLDERS = {
    "imagenet_train_unlabeled": "imagenet/train",
    "imagenet_val_unlabeled": "imagenet/val",
}


def register_all_unlabeled_folders(root: Optional[str] = None) -> None:
    """
    Register the built-in unlabelled folders (``BUILTIN_UNLABELED_FOLDERS``) under
    ``root`` (default ``$DETECTRON2_DATASETS``, else "datasets"), as detectron2's
    builtin datasets do. Only registers; scans nothing. Names already registered
    (e.g. by a user before importing) are left alone.
    """
    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    for name, rel in BUILTIN_UNLABELED_FOLDERS.items():
        if name in DatasetCatalog.list():
            continue
        register_image_folder(name, os.path.join(root, rel))
