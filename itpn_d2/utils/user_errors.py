"""How every tool ends on bad input: one ``ERROR:`` line on stderr and a non-zero exit status.

A mistake in the user's input (a typo in an override, a missing or foreign checkpoint, no
readable image) is not a bug, so it gets no traceback: the first line of the exception's
message, or the whole message of a :class:`~itpn_d2.checkpoint.BackboneLoadError`, whose
report of missing and mis-shaped keys is the point. The exit status tells a script what
went wrong without parsing the message: 2 for a config error (as ``argparse`` exits on a
bad flag), 1 for anything else.
"""
import logging
import sys
from typing import NoReturn, Optional

from itpn_d2.checkpoint import BackboneLoadError
from itpn_d2.config import ConfigOverrideError

__all__ = ["user_error_message", "exit_status_of", "exit_on_user_error"]


def user_error_message(error: BaseException) -> str:
    """The text of the ``ERROR:`` line for ``error``."""
    text = str(error)
    return text if isinstance(error, BackboneLoadError) else text.splitlines()[0] if text else ""


def exit_status_of(error: BaseException) -> int:
    """2 for a config error, 1 otherwise."""
    return 2 if isinstance(error, ConfigOverrideError) else 1


def exit_on_user_error(error: BaseException, log: Optional[logging.Logger] = None) -> NoReturn:
    """Print ``ERROR: <message>`` to stderr (and to ``log``, for a run's log file) and exit."""
    msg = user_error_message(error)
    if log is not None:
        log.error(msg)
    print(f"ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(exit_status_of(error))
