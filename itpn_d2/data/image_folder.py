"""Unlabelled image folders as detectron2 datasets (for pre-training).

A folder tree of images (ImageNet's ``train/<class>/<img>.JPEG`` layout or any
other tree) becomes a detectron2 dataset whose dicts carry only
``{"file_name", "image_id"}``: no labels are read, so class sub-folders are just
folders. Registration is lazy: nothing touches the disk until
``DatasetCatalog.get(name)`` is called (i.e. when a data loader is built).
"""
import logging
import os
import stat
from typing import Iterable, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .skipped_files import printable

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


def _scan(root: str, exts: tuple) -> Tuple[List[str], List[str]]:
    """(relative paths of the regular image files, relative paths of image-named other entries).

    Depth-first in sorted order; a folder reached twice (a symbolic link back to an ancestor,
    ``again -> .``, or two links to one folder) is read only the first time, so the scan
    always ends and lists each file once. Only regular files count: opening a FIFO named
    ``x.png`` would block forever, a device would read garbage.
    """
    files, not_regular = [], []
    seen_dirs = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(path)  # follows a link once, to what it names
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            logger.warning(f"Image folder: cannot list '{printable(path)}' ({type(e).__name__}); skipped")
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = os.path.join(rel, entry.name) if rel else entry.name
            try:
                mode = os.stat(entry.path).st_mode
            except OSError:  # broken link, vanished, permission
                mode = None
            if mode is not None and stat.S_ISDIR(mode):
                subdirs.append(child)
            elif entry.name.lower().endswith(exts):
                (files if mode is not None and stat.S_ISREG(mode) else not_regular).append(child)
        stack.extend(reversed(subdirs))  # visit in sorted order: the first path to a folder wins
    return files, not_regular


def load_image_folder(root: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> List[dict]:
    """
    List every image file under ``root``, recursively, in a deterministic order.

    Args:
        root: folder to scan; symbolic links are followed, each folder is read once
            (links that loop back are ignored). Only regular files are listed.
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
            f"Image folder '{printable(root)}' does not exist or is not a directory. "
            "Put the images there (any tree of image files, e.g. ImageNet's train/<class>/*.JPEG), "
            "or set $DETECTRON2_DATASETS to the folder holding it."
        )
    rel_paths, not_regular = _scan(root, exts)
    if not_regular:
        logger.warning(
            f"Image folder '{printable(root)}': ignored {len(not_regular)} image-named entr"
            f"{'y' if len(not_regular) == 1 else 'ies'} that {'is' if len(not_regular) == 1 else 'are'} not "
            "a regular file (FIFO, device, socket or broken link), e.g. "
            + ", ".join(f"'{printable(p)}'" for p in not_regular[:3])
        )
    if not rel_paths:
        raise RuntimeError(
            f"Image folder '{printable(root)}' contains no image files (looked for extensions {list(exts)})."
        )
    # Sort the relative paths as a whole so the order does not depend on the scan's order.
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
