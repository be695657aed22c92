"""Config handling shared by the training script and every tool: checked command-line
overrides, loading, and the constants the configs share."""
from .command_line import add_opts_argument, load_config, overrides_of
from .constants import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from .overrides import (
    FORWARDED_KWARGS,
    OPTIONAL_KEYS,
    ConfigOverrideError,
    ConfigValueError,
    apply_overrides,
    check_override_keys,
    validate_config,
)

__all__ = [
    "load_config",
    "add_opts_argument",
    "overrides_of",
    "apply_overrides",
    "check_override_keys",
    "validate_config",
    "ConfigOverrideError",
    "ConfigValueError",
    "OPTIONAL_KEYS",
    "FORWARDED_KWARGS",
    "IMAGENET_PIXEL_MEAN",
    "IMAGENET_PIXEL_STD",
]
