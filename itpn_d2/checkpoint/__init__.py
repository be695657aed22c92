"""Checkpoints of iTPN models: safe reading, checked loading, crash-safe writing, conversion.

* :mod:`.safe_load`: read any checkpoint file without running code from it
  (:func:`load_checkpoint_file`), the weights inside it (:func:`checkpoint_dict`,
  :func:`extract_state_dict`), the newest finite checkpoint of a run (:func:`last_finite_checkpoint`).
* :mod:`.atomic_save`: write a file so that a kill leaves the old version or the new one
  (:func:`atomic_write`), and tell whose temporary files are stale.
* :mod:`.checkpointer`: :class:`ITPNCheckpointer`, detectron2's checkpointer with exact, checked
  backbone loading (``backbone_load``: strict / encoder_only / partial) and atomic saving.
* :mod:`.key_report`: the key comparison and report both the checkpointer and the converter print.
* :mod:`.convert`: official iTPN / mmpretrain files to this layout (``tools/convert_pretrained.py``).
* :mod:`.errors`: what each of them raises.
"""
from .atomic_save import atomic_write, stale_temporaries, temporary_owner
from .checkpointer import BACKBONE_LOAD_MODES, ITPNCheckpointer, check_weights_fit
from .convert import (
    SOURCES,
    ConversionError,
    build_backbone,
    convert_file,
    convert_state_dict,
    detect_arch,
    detect_source,
    verify,
)
from .errors import (
    BackboneLoadError,
    CheckpointFileError,
    CheckpointIntegrityError,
    CheckpointWriteError,
    NonFiniteWeightsError,
)
from .key_report import compare_state_dicts, format_key_report
from .safe_load import (
    ALLOW_UNSAFE_ENV,
    checkpoint_dict,
    extract_state_dict,
    last_finite_checkpoint,
    load_checkpoint_file,
    non_finite_tensors,
)

__all__ = [
    "ITPNCheckpointer",
    "BACKBONE_LOAD_MODES",
    "ALLOW_UNSAFE_ENV",
    "BackboneLoadError",
    "CheckpointFileError",
    "CheckpointIntegrityError",
    "CheckpointWriteError",
    "NonFiniteWeightsError",
    "ConversionError",
    "atomic_write",
    "stale_temporaries",
    "temporary_owner",
    "check_weights_fit",
    "checkpoint_dict",
    "compare_state_dicts",
    "format_key_report",
    "extract_state_dict",
    "last_finite_checkpoint",
    "load_checkpoint_file",
    "non_finite_tensors",
    "SOURCES",
    "build_backbone",
    "convert_file",
    "convert_state_dict",
    "detect_arch",
    "detect_source",
    "verify",
]
