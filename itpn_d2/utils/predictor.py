"""Single-image inference and visualisation for LazyConfig models (detectron2's
``DefaultPredictor`` / demo ``VisualizationDemo``, which only take yacs configs).

Used by ``tools/demo.py``; works for any model returning detectron2's standard
outputs (``instances``, ``sem_seg``, ``panoptic_seg``).
"""
import contextlib
import logging
from typing import Optional

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["LazyPredictor", "metadata_for", "sem_seg_labels_to_draw", "visualize"]


def _get(cfg, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        try:
            if part not in node:
                return default
            node = node[part]
        except TypeError:
            return default
    return node


def _num_classes(cfg) -> Optional[int]:
    for key in ("model.sem_seg_head.num_classes", "model.roi_heads.num_classes"):
        n = _get(cfg, key)
        if n is not None:
            return int(n)
    return None


def metadata_for(cfg) -> Metadata:
    """Metadata of the config's test dataset when registered (class names, colours),
    else a generic one with ``class<i>`` names for the model's number of classes."""
    names = _get(cfg, "dataloader.test.dataset.names")
    if isinstance(names, str):
        names = [names]
    if names and names[0] in DatasetCatalog.list():
        meta = MetadataCatalog.get(names[0])
        if not (meta.get("thing_classes") or meta.get("stuff_classes")):
            # register_coco_instances fills thing_classes only when the json is first loaded
            try:
                DatasetCatalog.get(names[0])
            except Exception as e:  # noqa: BLE001 - names are a nicety; the predictions still come
                logging.getLogger(__name__).warning(
                    f"could not load dataset {names[0]!r} for its class names ({type(e).__name__}: {e}); "
                    "labels are shown as class ids"
                )
        return meta
    meta = MetadataCatalog.get("__itpn_d2_demo_generic")
    n = _num_classes(cfg)
    if n is not None and not meta.get("thing_classes"):
        rng = np.random.RandomState(0)
        classes = [f"class{i}" for i in range(n)]
        colors = [tuple(int(c) for c in rng.randint(0, 255, 3)) for _ in range(n)]
        meta.set(thing_classes=classes, stuff_classes=classes, thing_colors=colors, stuff_colors=colors)
    return meta


class LazyPredictor:
    """Builds ``cfg.model`` in eval mode on ``cfg.train.device`` and runs it on one BGR image.

    The test-time resize is the config's ``dataloader.test.mapper.augmentations``
    when present (none otherwise); the model input format is the test mapper's
    ``image_format`` or ``model.input_format`` (default BGR, as detectron2).
    Weights are not loaded here; load them into ``predictor.model``.
    """

    def __init__(self, cfg, *, bf16: bool = False):
        self.cfg = cfg
        self.device = torch.device(_get(cfg, "train.device", "cpu"))
        self.model = instantiate(cfg.model).to(self.device).eval()
        augs = _get(cfg, "dataloader.test.mapper.augmentations")
        self.aug = T.AugmentationList([instantiate(a) for a in augs]) if augs else T.AugmentationList([])
        self.input_format = _get(cfg, "dataloader.test.mapper.image_format") or _get(cfg, "model.input_format", "BGR")
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"unsupported input format {self.input_format!r} (RGB or BGR)")
        self.bf16 = bf16

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def __call__(self, bgr_image: np.ndarray) -> dict:
        """(H, W, 3) uint8 BGR -> the model's output dict for the image (at H x W)."""
        if bgr_image.ndim != 3 or bgr_image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) BGR image, got shape {bgr_image.shape}")
        h, w = bgr_image.shape[:2]
        image = bgr_image[:, :, ::-1] if self.input_format == "RGB" else bgr_image
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.aug(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))).float()
        with self._autocast():
            out = self.model([{"image": tensor.to(self.device), "height": h, "width": w}])[0]
        return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}


def sem_seg_labels_to_draw(logits: torch.Tensor, metadata: Metadata) -> torch.Tensor:
    """(K, H, W) logits -> (H, W) labels for ``Visualizer.draw_sem_seg``, with the dataset's
    background class (``metadata.background_label``, when the dataset sets one) left undrawn:
    the Visualizer skips label values outside ``stuff_classes``, so the image shows through where
    nothing was found instead of under a background-coloured overlay."""
    labels = logits.argmax(dim=0).cpu()
    background = metadata.get("background_label", None)
    if background is not None:
        labels[labels == background] = len(metadata.stuff_classes)
    return labels


def visualize(
    bgr_image: np.ndarray,
    predictions: dict,
    metadata: Metadata,
    confidence_threshold: float = 0.5,
    instance_mode: ColorMode = ColorMode.IMAGE,
) -> np.ndarray:
    """detectron2 ``Visualizer`` rendering of ``predictions`` over the image -> (H, W, 3) RGB uint8."""
    rgb = convert_image_to_rgb(bgr_image, "BGR")
    vis = Visualizer(rgb, metadata, instance_mode=instance_mode)
    if "panoptic_seg" in predictions:
        seg, info = predictions["panoptic_seg"]
        out = vis.draw_panoptic_seg_predictions(seg.cpu(), info)
    elif "sem_seg" in predictions:
        out = vis.draw_sem_seg(sem_seg_labels_to_draw(predictions["sem_seg"], metadata))
    elif "instances" in predictions:
        inst = predictions["instances"].to("cpu")
        if inst.has("scores"):
            inst = inst[inst.scores >= confidence_threshold]
        out = vis.draw_instance_predictions(inst)
    else:
        raise KeyError(f"nothing to draw: predictions have keys {sorted(predictions)}")
    return out.get_image()
