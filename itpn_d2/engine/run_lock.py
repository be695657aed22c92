"""One live run per output directory.

Two runs writing into one ``train.output_dir`` delete each other's temporary files, interleave
checkpoints and ``metrics.json``, and neither is told. :func:`lock_output_dir` takes an
exclusive ``flock`` on ``{output_dir}/.itpn_d2.lock`` for the life of the process and writes who
holds it (host, pid, start time, command line) into the file. A second run on the same folder
is refused with :class:`OutputDirLockedError` naming the holder. The kernel drops a ``flock``
when its process dies, however it dies, so the lock of a killed run is free at once and is
simply taken over (its stale holder text is overwritten); there is no stale-lock timeout to tune.

``flock`` works on local file systems and on NFSv4 (Linux emulates it with POSIX locks there).
"""
import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Optional

__all__ = ["OutputDirLockedError", "OutputDirLock", "lock_output_dir", "LOCK_NAME"]

LOCK_NAME = ".itpn_d2.lock"


class OutputDirLockedError(RuntimeError):
    """Another live run holds the output directory."""


def _holder_text() -> str:
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
    )


def _describe(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"process {h['pid']} on host {h['host']} (started {h['started']}: {h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class OutputDirLock:
    """An exclusive, non-blocking lock on one output directory (module docstring)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputDirLock":
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            finally:
                os.close(fd)
            raise OutputDirLockedError(
                f"train.output_dir {self.output_dir} is in use by another live run: {_describe(raw)}. "
                "Two runs in one folder overwrite each other's checkpoints and metrics: wait for it to end, "
                "or give this run another train.output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_output_dir(output_dir: str) -> Optional[OutputDirLock]:
    """Lock ``output_dir`` for this process; None for a remote (``scheme://``) folder, where no
    local lock means anything."""
    if not output_dir or "://" in output_dir:
        return None
    return OutputDirLock(output_dir).acquire()
