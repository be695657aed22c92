"""The errors of checkpoint reading, loading and writing.

Each one names the file and says what to do; ``tools/lazyconfig_train_net.py`` prints them as
one ``ERROR:`` line (the key report of a :class:`BackboneLoadError` in full).
"""

__all__ = [
    "BackboneLoadError",
    "CheckpointFileError",
    "CheckpointIntegrityError",
    "CheckpointWriteError",
    "NonFiniteWeightsError",
]


class CheckpointFileError(RuntimeError):
    """A checkpoint file could not be read (missing, truncated, corrupt, or needs an unsafe load)."""


class BackboneLoadError(RuntimeError):
    """The checkpoint's backbone tensors do not match the model's."""


class CheckpointIntegrityError(CheckpointFileError):
    """A readable checkpoint whose content cannot be right (corrupt bytes, wrong dtypes, NaN / inf)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. no space left on the device); the message says why."""


class NonFiniteWeightsError(FloatingPointError):
    """The model's weights hold NaN / inf: not saved, so that no checkpoint of them exists."""
