"""A config as every tool reads it: ``LazyConfig.load``, then the command-line overrides,
checked (:mod:`itpn_d2.config.overrides`), so that a typo fails in every tool alike.

Overrides are spelt as detectron2's ``demo/demo.py`` spells them: ``--opts key=value ...``
after the other flags (``argparse.REMAINDER``: everything after ``--opts`` is an override).
``tools/lazyconfig_train_net.py`` also keeps the positional form of detectron2's
``default_argument_parser``; :func:`overrides_of` merges both.
"""
import argparse
from typing import Callable, List, Optional, Sequence

from detectron2.config import LazyConfig

from .overrides import apply_overrides

__all__ = ["load_config", "add_opts_argument", "overrides_of"]

OPTS_HELP = "config overrides key=value (after every other flag); +key=value adds a new key"


def add_opts_argument(parser: argparse.ArgumentParser, dest: str = "opts") -> argparse.ArgumentParser:
    """Add ``--opts KEY=VALUE ...`` (``argparse.REMAINDER``) to ``parser``."""
    parser.add_argument("--opts", dest=dest, default=[], nargs=argparse.REMAINDER, help=OPTS_HELP)
    return parser


def overrides_of(args: argparse.Namespace, *dests: str) -> List[str]:
    """The overrides held in ``args.<dest>`` for each of ``dests`` (default ``opts``), in order.

    A literal ``--opts`` inside a positional remainder (``train.py a=1 --opts b=2``) only
    separates overrides, so it is dropped."""
    out = []
    for dest in dests or ("opts",):
        out += [o for o in (getattr(args, dest, None) or []) if o != "--opts"]
    return out


def load_config(
    config_file: str,
    overrides: Optional[Sequence[str]] = None,
    *,
    edit: Optional[Callable[[object], None]] = None,
):
    """``LazyConfig.load(config_file)``; ``edit(cfg)`` (a tool's own defaults, which the command
    line may still override); then the checked ``overrides``. Raises
    :class:`~itpn_d2.config.overrides.ConfigOverrideError` for an unknown key."""
    cfg = LazyConfig.load(config_file)
    if edit is not None:
        edit(cfg)
    return apply_overrides(cfg, list(overrides or []))
