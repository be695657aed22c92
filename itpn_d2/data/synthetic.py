"""A deterministic generator of a small instance-segmentation dataset ("itpn_synthetic").

Every image shows a few flat objects of ``K = len(CATEGORIES)`` shape categories (circle, rectangle,
triangle, star, ring, cross) of varied size, rotation, colour and texture (solid, stripes, noise,
shading), drawn over a cluttered background (colour gradient, thin lines, translucent irregular
blobs, pixel noise). Objects may overlap; each annotation is the *visible* part of its object after
the objects drawn later have been painted over it.

Output layout under ``root`` (all paths relative to it)::

    manifest.json                       generator version + arguments; the cache key
    annotations/instances_{split}.json  COCO instances: RLE masks, bbox/area of the visible mask,
                                        iscrowd 0, categories with ids 1..K
    {split}/images/NNNNNN.{jpg,png}     RGB images (split = train, val)
    {split}/sem_seg/NNNNNN.png          uint8 label maps: 0 = background, c = category id c (1..K),
                                        255 = ignore (tiny visible fragments that were not annotated)
    unlabeled/images/NNNNNN.{jpg,png}   images from their own seed stream, for pre-training

Semantic labels follow detectron2's convention: the label value is the index into
``stuff_classes = ["background", *CATEGORIES]`` and ``255`` is ``ignore_label``, which
``SemSegEvaluator`` and the segmentation losses skip. Instance category ``c`` (COCO id) is thing class
``c - 1`` (detectron2's contiguous id) and semantic class ``c``.

Masks are stored as COCO RLE (rings have holes, which COCO polygons cannot express), so a detectron2
``DatasetMapper`` must use ``instance_mask_format="bitmask"``.

Each image is drawn from its own RNG, seeded by ``(seed, split, index)``: image ``i`` of a split is
the same whatever the split sizes are, and the output is byte-identical for equal arguments.
Generation is cached: :func:`ensure_synthetic` reuses ``root`` when its manifest matches the
arguments and every file is present, and otherwise regenerates into a temporary folder which then
replaces ``root`` in one rename.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "CATEGORIES",
    "GENERATOR_VERSION",
    "SEM_SEG_IGNORE",
    "SyntheticSpec",
    "ensure_synthetic",
    "render_image",
    "split_paths",
    "stuff_classes",
]

logger = logging.getLogger(__name__)

# Bump whenever the drawing code changes what a given (arguments, seed) produces: caches are keyed on it.
GENERATOR_VERSION = "1"
GENERATOR_NAME = "itpn_d2.data.synthetic"
MANIFEST = "manifest.json"

CATEGORIES: Tuple[str, ...] = ("circle", "rectangle", "triangle", "star", "ring", "cross")
SEM_SEG_IGNORE = 255
SPLITS = ("train", "val", "unlabeled")
# Seed-stream ids keep the splits' images independent of each other and of the split sizes.
_SPLIT_STREAM = {"train": 0, "val": 1, "unlabeled": 2}

# Object radius (circumscribed circle) as a fraction of the image side.
_RADIUS_RANGE = (0.07, 0.2)
# A placement is rejected when it would leave an earlier object with less than this visible fraction.
_MIN_VISIBLE_FRACTION = 0.35


def stuff_classes() -> List[str]:
    """Semantic-segmentation class names: label value ``v`` is ``stuff_classes()[v]``."""
    return ["background", *CATEGORIES]


@dataclass(frozen=True)
class SyntheticSpec:
    """Generation arguments; together with :data:`GENERATOR_VERSION` they fully determine the output.

    Args:
        num_train, num_val: labelled images per split.
        num_unlabeled: extra images (own seed stream) for pre-training; 0 for none.
        image_size: side of the square images in pixels.
        min_objects, max_objects: objects attempted per image (inclusive range); an object whose
            placement would hide too much of an earlier one is skipped.
        seed: base seed.
        min_visible_area: visible pixels an object needs to be annotated; ``None`` picks
            ``max(12, image_size**2 // 1000)``.
        image_format: "jpg" (quality 95, small) or "png" (lossless).
    """

    num_train: int = 400
    num_val: int = 50
    num_unlabeled: int = 1000
    image_size: int = 256
    min_objects: int = 2
    max_objects: int = 6
    seed: int = 0
    min_visible_area: Optional[int] = None
    image_format: str = "jpg"

    def __post_init__(self):
        def check(ok, field, why):
            if not ok:
                raise ValueError(f"SyntheticSpec.{field}={getattr(self, field)!r}: {why}")

        for field in ("num_train", "num_val", "num_unlabeled", "image_size", "min_objects", "max_objects", "seed"):
            value = getattr(self, field)
            check(isinstance(value, (int, np.integer)) and not isinstance(value, bool), field, "must be an int")
        check(self.num_train >= 1, "num_train", "must be >= 1")
        check(self.num_val >= 1, "num_val", "must be >= 1")
        check(self.num_unlabeled >= 0, "num_unlabeled", "must be >= 0")
        check(self.image_size >= 32, "image_size", "must be >= 32")
        check(self.min_objects >= 1, "min_objects", "must be >= 1")
        check(self.max_objects >= self.min_objects, "max_objects", f"must be >= min_objects={self.min_objects}")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(
            self.min_visible_area is None or (isinstance(self.min_visible_area, int) and self.min_visible_area >= 1),
            "min_visible_area",
            "must be None or an int >= 1",
        )
        check(self.image_format in ("jpg", "png"), "image_format", "must be 'jpg' or 'png'")

    @property
    def visible_area_threshold(self) -> int:
        if self.min_visible_area is not None:
            return self.min_visible_area
        return max(12, self.image_size * self.image_size // 1000)

    def num_images(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "unlabeled": self.num_unlabeled}[split]

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


def split_paths(root: str, split: str) -> Dict[str, str]:
    """Absolute paths of one split's folders/files: ``image_root``, ``sem_seg_root``, ``json_file``
    (the last two only for "train"/"val")."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    root = os.path.abspath(root)
    paths = {"image_root": os.path.join(root, split, "images")}
    if split != "unlabeled":
        paths["sem_seg_root"] = os.path.join(root, split, "sem_seg")
        paths["json_file"] = os.path.join(root, "annotations", f"instances_{split}.json")
    return paths


def image_file_name(index: int, spec: SyntheticSpec) -> str:
    return f"{index:06d}.{spec.image_format}"


def sem_seg_file_name(index: int) -> str:
    return f"{index:06d}.png"


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split], index]))


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _hsv_color(rng: np.random.Generator, sat: Tuple[float, float], val: Tuple[float, float]) -> np.ndarray:
    hsv = np.array(
        [[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]], dtype=np.float32
    ).round().astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _ellipse(rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _shape_polygons(category: str, radius: float, rng: np.random.Generator) -> List[Tuple[np.ndarray, int]]:
    """Polygons (centred at 0, within ``radius``) and the value each is filled with, in order:
    a later polygon filled with 0 cuts a hole."""
    r = radius
    if category == "circle":
        polys = [(_ellipse(r, r * rng.uniform(0.85, 1.0)), 1)]
    elif category == "rectangle":
        phi = rng.uniform(math.atan(0.45), math.pi / 4)  # aspect ratio between 0.45 and 1
        a, b = r * math.cos(phi), r * math.sin(phi)
        polys = [(np.array([[-a, -b], [a, -b], [a, b], [-a, b]]), 1)]
    elif category == "triangle":
        t = np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.2, 0.2, size=3)
        rr = r * rng.uniform(0.9, 1.0, size=3)
        polys = [(np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1), 1)]
    elif category == "star":
        t = np.arange(10) * (np.pi / 5)
        rr = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        polys = [(np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1), 1)]
    elif category == "ring":
        inner = r * rng.uniform(0.45, 0.62)
        polys = [(_ellipse(r, r), 1), (_ellipse(inner, inner), 0)]
    elif category == "cross":
        w, L = r * rng.uniform(0.22, 0.32), r * 0.95
        polys = [
            (
                np.array(
                    [[-w, -L], [w, -L], [w, -w], [L, -w], [L, w], [w, w], [w, L], [-w, L], [-w, w], [-L, w], [-L, -w], [-w, -w]]
                ),
                1,
            )
        ]
    else:
        raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")
    angle = rng.uniform(0, 2 * np.pi)
    return [(_rotate(p, angle), v) for p, v in polys]


def _rasterize(polys: List[Tuple[np.ndarray, int]], center: np.ndarray, size: int) -> np.ndarray:
    canvas = np.zeros((size, size), dtype=np.uint8)
    for poly, value in polys:
        # 4 fractional bits: sub-pixel vertex positions keep small shapes true to their outline
        pts = np.round((poly + center) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [pts], int(value), lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _texture(shape: Tuple[int, int], color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An (h, w, 3) float patch: solid, stripes, noise or shading around ``color``."""
    h, w = shape
    kind = rng.integers(4)
    if kind == 0:
        return np.broadcast_to(color, (h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 1:
        period = rng.uniform(4, 12)
        other = np.clip(color * rng.uniform(0.35, 0.6) + rng.uniform(0, 60), 0, 255)
        stripe = ((proj / period) % 1.0) < 0.5
        return np.where(stripe[..., None], color, other).astype(np.float32)
    if kind == 2:
        return (color + rng.normal(0, rng.uniform(15, 35), size=(h, w, 3))).astype(np.float32)
    ramp = proj / max(float(np.abs(proj).max()), 1.0)
    return (color * (0.75 + 0.4 * ramp[..., None])).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    c0 = _hsv_color(rng, (0.0, 0.5), (0.2, 0.9))
    c1 = _hsv_color(rng, (0.0, 0.5), (0.2, 0.9))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]

    # Clutter that is not an object: translucent irregular blobs and thin lines.
    for _ in range(rng.integers(0, 5)):
        # many evenly spread vertices with jittered radii: lumpy outlines unlike any category
        n = 14
        ang = (np.arange(n) + rng.uniform(-0.3, 0.3, size=n)) * (2 * np.pi / n)
        rad = size * rng.uniform(0.03, 0.12) * rng.uniform(0.6, 1.0, size=n)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1) + rng.uniform(0, size, size=2)
        blob = _rasterize([(pts, 1)], np.zeros(2), size)
        alpha = rng.uniform(0.25, 0.5)
        img[blob] = (1 - alpha) * img[blob] + alpha * _hsv_color(rng, (0.2, 1.0), (0.3, 1.0))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(0, 7)):
        p0 = tuple(int(v) for v in rng.integers(0, size, size=2))
        p1 = tuple(int(v) for v in rng.integers(0, size, size=2))
        color = tuple(int(v) for v in _hsv_color(rng, (0.0, 1.0), (0.1, 1.0)))
        cv2.line(img, p0, p1, color, thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_8)
    return img.astype(np.float32)


def render_image(spec: SyntheticSpec, rng: np.random.Generator, first_category: Optional[int] = None):
    """Draw one image.

    Args:
        first_category: index into :data:`CATEGORIES` of the first (bottom) object; random when None.
            The first object is always placed and annotated (later objects may not hide too much of
            it), so cycling this over a split guarantees every category appears in it.

    Returns:
        image: (H, W, 3) uint8 RGB.
        instances: list of dicts, bottom object first: ``category_id`` in 1..K; ``mask`` (H, W)
            bool, the visible part of the object (at least ``spec.visible_area_threshold`` pixels);
            ``full_mask`` (H, W) bool, the whole object as if nothing covered it.
        sem_seg: (H, W) uint8 label map (see the module docstring).
    """
    size = spec.image_size
    img = _background(size, rng)
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the top object at each pixel
    categories: List[int] = []
    full_masks: List[np.ndarray] = []
    threshold = spec.visible_area_threshold

    num = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    for j in range(num):
        cat_index = int(rng.integers(len(CATEGORIES)))
        if j == 0 and first_category is not None:
            cat_index = first_category % len(CATEGORIES)
        for _attempt in range(20):
            radius = size * math.exp(rng.uniform(math.log(_RADIUS_RANGE[0]), math.log(_RADIUS_RANGE[1])))
            center = rng.uniform(radius, size - radius, size=2)
            polys = _shape_polygons(CATEGORIES[cat_index], radius, rng)
            shape = _rasterize(polys, center, size)
            if shape.sum() < threshold:
                continue
            # Occlusion control: every earlier object keeps a decent visible part.
            covered = owner[shape]
            lost = np.bincount(covered[covered >= 0], minlength=len(categories))
            visible = np.bincount(owner[owner >= 0], minlength=len(categories))
            left = visible - lost
            full = np.asarray([m.sum() for m in full_masks], dtype=np.int64)
            if np.any(left < np.maximum(threshold, _MIN_VISIBLE_FRACTION * full)):
                continue
            break
        else:
            continue

        ys, xs = np.nonzero(shape)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        local = shape[y0:y1, x0:x1]
        bg_here = img[y0:y1, x0:x1][local].mean(axis=0)
        for _ in range(10):  # keep the object distinguishable from what lies under it
            color = _hsv_color(rng, (0.45, 1.0), (0.45, 1.0))
            if np.abs(color - bg_here).sum() >= 90:
                break
        patch = _texture((int(y1 - y0), int(x1 - x0)), color, rng)
        img[y0:y1, x0:x1][local] = patch[local]
        owner[shape] = len(categories)
        categories.append(cat_index + 1)
        full_masks.append(shape)

    img += rng.uniform(0, 8) * rng.standard_normal(size=img.shape, dtype=np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    sem_seg = np.zeros((size, size), dtype=np.uint8)
    instances = []
    for k, category_id in enumerate(categories):
        mask = owner == k
        if mask.sum() >= threshold:
            instances.append({"category_id": category_id, "mask": mask, "full_mask": full_masks[k]})
            sem_seg[mask] = category_id
        else:
            sem_seg[mask] = SEM_SEG_IGNORE
    return image, instances, sem_seg


def _coco_annotation(mask: np.ndarray, category_id: int, ann_id: int, image_id: int) -> Dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(category_id),
        "segmentation": rle,
        "area": float(mask.sum()),
        "bbox": [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)],
        "iscrowd": 0,
    }


def _write_image(path: str, image_rgb: np.ndarray, spec: SyntheticSpec) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if spec.image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    if not cv2.imwrite(path, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"cv2.imwrite failed for {path}")


def _generate_split(out_root: str, split: str, spec: SyntheticSpec) -> Dict[str, int]:
    paths = split_paths(out_root, split)
    os.makedirs(paths["image_root"], exist_ok=True)
    labelled = split != "unlabeled"
    if labelled:
        os.makedirs(paths["sem_seg_root"], exist_ok=True)
        os.makedirs(os.path.dirname(paths["json_file"]), exist_ok=True)
    images, annotations = [], []
    n = spec.num_images(split)
    start, last_log = time.perf_counter(), time.perf_counter()
    for i in range(n):
        image, instances, sem_seg = render_image(spec, image_rng(spec.seed, split, i), first_category=i)
        file_name = image_file_name(i, spec)
        _write_image(os.path.join(paths["image_root"], file_name), image, spec)
        if labelled:
            if not cv2.imwrite(os.path.join(paths["sem_seg_root"], sem_seg_file_name(i)), sem_seg):
                raise OSError(f"cv2.imwrite failed for {paths['sem_seg_root']}/{sem_seg_file_name(i)}")
            image_id = i + 1
            images.append({"id": image_id, "file_name": file_name, "height": spec.image_size, "width": spec.image_size})
            for inst in instances:
                annotations.append(_coco_annotation(inst["mask"], inst["category_id"], len(annotations) + 1, image_id))
        now = time.perf_counter()
        if now - last_log > 10 or i + 1 == n:
            last_log = now
            eta = (now - start) / (i + 1) * (n - i - 1)
            logger.info(f"itpn_synthetic {split}: {i + 1}/{n} images, ETA {eta:.0f}s")
    if labelled:
        coco = {
            "info": {"description": "itpn_synthetic", "version": GENERATOR_VERSION, "spec": spec.to_dict()},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)],
        }
        with open(paths["json_file"], "w") as f:
            json.dump(coco, f, separators=(",", ":"))
    return {"images": n, "annotations": len(annotations)}


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def _expected_files(root: str, spec: SyntheticSpec) -> List[str]:
    files = [os.path.join(root, MANIFEST)]
    for split in SPLITS:
        paths = split_paths(root, split)
        n = spec.num_images(split)
        files += [os.path.join(paths["image_root"], image_file_name(i, spec)) for i in range(n)]
        if split != "unlabeled":
            files.append(paths["json_file"])
            files += [os.path.join(paths["sem_seg_root"], sem_seg_file_name(i)) for i in range(n)]
    return files


def read_manifest(root: str) -> Optional[Dict]:
    """The manifest of a generated dataset at ``root``, or None when there is none (or it is unreadable)."""
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_up_to_date(root: str, spec: SyntheticSpec) -> bool:
    """Whether ``root`` holds this generator version's output for ``spec`` with every file present."""
    manifest = read_manifest(root)
    if manifest is None or manifest.get("generator") != GENERATOR_NAME:
        return False
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("spec") != spec.to_dict():
        return False
    return all(os.path.isfile(p) for p in _expected_files(root, spec))


@contextlib.contextmanager
def _lock(root: str):
    """An exclusive lock beside ``root`` so that concurrent processes generate it once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    parent, name = os.path.split(root)
    with open(os.path.join(parent, f".{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_synthetic(root: str, spec: Optional[SyntheticSpec] = None, **kwargs) -> Dict:
    """Make sure ``root`` holds the dataset for ``spec`` (or ``SyntheticSpec(**kwargs)``); generate it if not.

    Returns:
        dict with ``root`` (absolute), ``reused`` (bool: the cache was valid), ``seconds`` spent and
        the manifest (``spec``, ``version``, per-split ``counts``).

    Raises:
        FileExistsError: ``root`` exists, is not empty and holds no manifest of this generator (it is
            never deleted then).
    """
    if spec is None:
        spec = SyntheticSpec(**kwargs)
    elif kwargs:
        raise TypeError(f"pass either spec or keyword arguments, not both (got {sorted(kwargs)})")
    root = os.path.abspath(os.path.expanduser(root))
    if is_up_to_date(root, spec):
        return {"root": root, "reused": True, "seconds": 0.0, **read_manifest(root)}

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    with _lock(root):
        if is_up_to_date(root, spec):  # another process generated it while we waited
            return {"root": root, "reused": True, "seconds": 0.0, **read_manifest(root)}
        if os.path.isdir(root) and os.listdir(root):
            manifest = read_manifest(root)
            if manifest is None or manifest.get("generator") != GENERATOR_NAME:
                raise FileExistsError(
                    f"{root} is not empty and has no {MANIFEST} written by {GENERATOR_NAME}; "
                    "refusing to replace it. Pass another root or remove the folder."
                )
        elif os.path.exists(root) and not os.path.isdir(root):
            raise FileExistsError(f"{root} exists and is not a folder")

        logger.info(f"Generating itpn_synthetic into {root} ({spec.to_dict()}) ...")
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
        try:
            counts = {split: _generate_split(tmp, split, spec) for split in SPLITS}
            manifest = {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "spec": spec.to_dict(), "counts": counts}
            # The manifest is written last: a folder with a manifest is a complete one.
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
            old = None
            if os.path.exists(root):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
                os.rename(root, os.path.join(old, "data"))
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        seconds = time.perf_counter() - start
        logger.info(f"Generated itpn_synthetic in {seconds:.1f}s: {counts}")
    return {"root": root, "reused": False, "seconds": seconds, **manifest}
