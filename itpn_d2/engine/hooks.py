"""Training hooks for iTPN pre-training."""
import logging
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from itpn_d2.utils.panel_titles import add_panel_titles
from itpn_d2.utils.visualize_mim import load_eval_image, panels_from_model_output, stack_rows

__all__ = ["ReconstructionVisualizer", "BatchCallbackLoader"]

logger = logging.getLogger(__name__)


class BatchCallbackLoader:
    """Iterates ``loader`` and calls ``on_batch(batch)`` on each batch before the trainer gets it;
    every other attribute (``dataset``, ``batch_size``, ...) is the loader's. Hooks install it
    over ``trainer.data_loader`` in ``before_train`` (SimpleTrainer makes its iterator at the
    first step, after that)."""

    def __init__(self, loader, on_batch):
        self.loader, self.on_batch = loader, on_batch

    def __iter__(self):
        for batch in self.loader:
            self.on_batch(batch)
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class ReconstructionVisualizer(HookBase):
    """
    Every ``period`` iterations (and after the last one), run the pre-training model in
    eval mode on a fixed set of images and write
    ``{output_dir}/reconstructions/iter_{NNNNNNN}.png``: a title row, then one row per image,
    original | masked input | reconstruction | reconstruction with visible units pasted.

    Runs on the main process only, under ``torch.no_grad``, inside a forked RNG state
    so that training's random streams (and so a resumed run's loss curve) are unchanged.
    The model's eval mode draws its masks from its own seeded generator, so successive
    figures show the same masks and are comparable.
    """

    def __init__(
        self,
        period: int,
        output_dir: str,
        *,
        file_names: Optional[Sequence[str]] = None,
        dataset_name=None,
        num_images: int = 4,
        image_size: int = 224,
    ):
        """
        Args:
            period: iterations between figures (<= 0: only after the last iteration).
            output_dir: run directory (e.g. ``cfg.train.output_dir``); figures go to its
                ``reconstructions/`` sub-folder.
            file_names: images to show; or
            dataset_name: take the first readable ``num_images`` images of this dataset
                (or list of datasets, e.g. ``"${dataloader.train.dataset.names}"``).
            image_size: the images are resized (shorter side) and centre-cropped to this.
        """
        if (file_names is None) == (dataset_name is None):
            raise ValueError("ReconstructionVisualizer: give exactly one of file_names or dataset_name")
        self.period = int(period)
        self.output_dir = os.path.join(output_dir, "reconstructions")
        self.file_names = list(file_names) if file_names is not None else None
        self.dataset_name = dataset_name
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self._images: Optional[List[torch.Tensor]] = None

    def _load_images(self) -> List[torch.Tensor]:
        if self.file_names is not None:
            candidates = self.file_names
        else:
            names = [self.dataset_name] if isinstance(self.dataset_name, str) else list(self.dataset_name)
            candidates = [d["file_name"] for n in names for d in DatasetCatalog.get(n)]
        images = []
        for f in candidates:
            try:
                images.append(load_eval_image(f, self.image_size))
            except Exception as e:  # a bad file must not stop training
                logger.warning(f"ReconstructionVisualizer: skipping unreadable image '{f}' ({type(e).__name__}: {e})")
                continue
            if len(images) == self.num_images:
                break
        if not images:
            raise RuntimeError(
                f"ReconstructionVisualizer: no readable image among {len(candidates)} candidates "
                f"({self.dataset_name or 'file_names'})"
            )
        return images

    def after_step(self):
        next_iter = self.trainer.iter + 1
        last = next_iter == self.trainer.max_iter
        if last or (self.period > 0 and next_iter % self.period == 0):
            self.write(next_iter)

    @torch.no_grad()
    def render(self, model) -> np.ndarray:
        """Run ``model`` (a MaskedPretrainer, possibly DDP-wrapped) in eval mode on the images;
        returns the (title row + rows, 4 panels) uint8 figure. The model's train/eval mode is restored."""
        if self._images is None:
            self._images = self._load_images()
        model = _unwrap(model)
        was_training = model.training
        model.eval()
        try:
            # Eager even where train.compile compiled the model's submodules: this runs on the
            # main process alone, and an eval-mode call would compile new graphs there while
            # the other ranks wait for it in their next all-reduce.
            with torch.random.fork_rng(devices=[]), torch.compiler.set_stance("force_eager"):
                out = model([{"image": im} for im in self._images])
        finally:
            model.train(was_training)
        return add_panel_titles(stack_rows(panels_from_model_output(out)))

    def write(self, iteration: int) -> Optional[str]:
        if not comm.is_main_process():
            return None
        figure = self.render(self.trainer.model)
        PathManager.mkdirs(self.output_dir)
        path = os.path.join(self.output_dir, f"iter_{iteration:07d}.png")
        with PathManager.open(path, "wb") as f:
            Image.fromarray(figure).save(f, format="PNG")
        logger.info(f"Wrote reconstruction figure {path}")
        return path
