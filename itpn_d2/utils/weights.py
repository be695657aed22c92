"""Weights for the tools that run a model (demo, reconstruction figures): one loader that
reads a checkpoint the way training does and says which file it loaded.

Training loads through ``tools/lazyconfig_train_net.py``'s checkpointer; the tools have no
trainer, so they call :func:`load_weights`, which uses the same
:class:`~itpn_d2.checkpoint.ITPNCheckpointer` (safe file reading, exact backbone keys) and
logs the path and, when the file records it, the training iteration it was saved at.
"""
import logging
import os
from typing import Optional

from torch import nn

from itpn_d2.checkpoint import CheckpointFileError, ITPNCheckpointer

__all__ = ["load_weights", "MissingCheckpointError"]

logger = logging.getLogger(__name__)


class MissingCheckpointError(CheckpointFileError, FileNotFoundError):
    """The checkpoint file does not exist."""


def load_weights(
    model: nn.Module,
    path: str,
    *,
    backbone_load: str = "strict",
    allow_random: bool = False,
    missing_hint: str = "no checkpoint given",
    log: Optional[logging.Logger] = None,
) -> Optional[int]:
    """Load the model weights of ``path`` into ``model`` (no optimizer or scheduler state).

    Args:
        path: a checkpoint file (``.pth`` of this repository, or a converted one); empty
            means "no weights".
        backbone_load: ``strict`` | ``encoder_only`` | ``partial`` (``ITPNCheckpointer``).
        allow_random: with an empty ``path``, keep the random initialisation (with a warning)
            instead of raising.
        missing_hint: the message of the error for an empty ``path`` (say how to give one).
        log: where to report (default: this module's logger).

    Returns:
        the iteration recorded in the checkpoint, or None (random weights, or not recorded).

    Raises:
        CheckpointFileError: empty ``path`` without ``allow_random``, or an unreadable file.
        MissingCheckpointError: ``path`` does not exist (a ``CheckpointFileError`` and a
            ``FileNotFoundError``).
        BackboneLoadError: the backbone tensors do not match the model's.
    """
    log = log or logger
    if not path:
        if not allow_random:
            raise CheckpointFileError(missing_hint)
        log.warning("No checkpoint: the model keeps its random initialisation.")
        return None
    if "://" not in path and not os.path.isfile(path):
        raise MissingCheckpointError(f"checkpoint file not found: {path}")
    extra = ITPNCheckpointer(model, backbone_load=backbone_load).load(path, checkpointables=[])
    iteration = extra.get("iteration") if isinstance(extra, dict) else None
    log.info(f"Loaded weights from {path}" + (f" (saved at iteration {iteration})" if iteration is not None else ""))
    return iteration

