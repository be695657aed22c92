"""Every random draw of a training step as a function of (seed, iteration, rank / sample).

detectron2 seeds each process once (``default_setup``: ``train.seed + rank``) and saves no
RNG state in its checkpoints, so whatever the model draws from the global RNG during a
step (drop path, dropout, Mask R-CNN's proposal sampling) differs between an interrupted
and resumed run and an uninterrupted one, and between runs on different numbers of
processes. :class:`DeterministicStepRNG`, before every step:

* sets the step key of :mod:`itpn_d2.modeling.drop_path`, so each sample's stochastic-depth
  decisions are a function of (seed, iteration, global sample index, layer): the same on
  any number of processes and after ``--resume``;
* seeds Python's, numpy's and torch's global RNGs (all devices) from (seed, iteration, rank),
  again right after the step's batch is drawn, so every other draw of the step (dropout,
  proposal / point sampling) is the same after ``--resume``, on the same number of processes.

The seed is saved in the checkpoint (detectron2 stores hooks' ``state_dict`` with the
trainer's), so a resumed run keeps its seed even where ``train.seed`` was random (< 0).
"""
import logging
import random
from typing import Optional

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from itpn_d2.data.resumable import derive_seed
from itpn_d2.engine.hooks import BatchCallbackLoader
from itpn_d2.modeling.drop_path import DropPathStep, set_drop_path_step

__all__ = ["DeterministicStepRNG"]

logger = logging.getLogger(__name__)

_GLOBAL_STREAM = 0x676C6F62  # separates the global-RNG seeds from other derived seeds


class DeterministicStepRNG(HookBase):
    """Sets the per-step random state from (seed, iteration, rank) (module docstring)."""

    def __init__(self, seed: Optional[int] = None):
        """
        Args:
            seed: non-negative int (e.g. ``train.seed``); ``None`` or negative: drawn once
                at the start of training, shared by all processes, and saved in checkpoints.
        """
        self.seed = int(seed) if seed is not None and int(seed) >= 0 else None

    def before_train(self):
        if self.seed is None:  # not given and not restored from a checkpoint
            self.seed = int(comm.shared_random_seed())
            logger.info(f"DeterministicStepRNG: drew the step seed {self.seed} (saved in checkpoints)")
        # Seed again once the step's batch is drawn: a DataLoader draws from torch's global
        # RNG when its iterator is made (the first step of every process, so the first step
        # after --resume too), which would shift the model's draws of that step.
        self.trainer.data_loader = BatchCallbackLoader(self.trainer.data_loader, lambda batch: self.seed_step())

    def seed_step(self):
        it, rank = int(self.trainer.iter), comm.get_rank()
        set_drop_path_step(DropPathStep(seed=self.seed, iteration=it, rank=rank))
        s = derive_seed(self.seed, it, rank, _GLOBAL_STREAM)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # also seeds every CUDA device

    def before_step(self):
        self.seed_step()

    def after_step(self):
        set_drop_path_step(None)

    def after_train(self):
        set_drop_path_step(None)

    def state_dict(self):
        return {"seed": self.seed} if self.seed is not None else {}

    def load_state_dict(self, state_dict):
        saved = state_dict.get("seed")
        if saved is None:
            return
        if self.seed is not None and int(saved) != self.seed:
            logger.warning(f"DeterministicStepRNG: the checkpoint's step seed {saved} replaces {self.seed}")
        self.seed = int(saved)
