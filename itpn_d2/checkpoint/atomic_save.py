"""Crash-safe file writing: a file is either its old version or the complete new one.

:func:`atomic_write` writes to a temporary file in the same folder, flushes and fsyncs it,
then renames it over the final name (``os.replace``, atomic on POSIX) and fsyncs the folder.
A process killed at any moment leaves the previous complete file and at worst a stray
``.<name>.<host>-<pid>.*.tmp``. Temporary names carry the writer's host and process id
(:func:`temporary_owner`), so that a later save removes only temporaries nobody is still
writing (:func:`stale_temporaries`: its own and those of dead processes of the same host,
never a live writer's, never another host's). A failed write says why in one line (e.g. no
space left on the device) instead of torch's ``[enforce fail at inline_container.cc]``.
"""
import errno
import os
import re
import socket
import tempfile
from typing import List, Optional, Tuple

from .errors import CheckpointWriteError

__all__ = ["atomic_write", "stale_temporaries", "temporary_owner", "writer_id"]


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable (POSIX); not possible / needed everywhere.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_fn, *, binary: bool = True) -> None:
    """Write ``path`` so that it is either absent / its old version or the complete new one.

    ``write_fn(f)`` writes into a temporary file in the same folder, which is flushed,
    fsync'ed and renamed over ``path``; the folder is fsync'ed after the rename. On any
    error the temporary file is removed and the error re-raised; ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "." + writer_id() + "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    recorder = _WriteErrorRecorder()
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; match a plain open()
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(recorder.wrap(f))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = recorder.error or _os_error_in_chain(e)
        if cause is not None:
            raise CheckpointWriteError(_write_error_message(path, folder, cause)) from e
        raise
    _fsync_dir(folder)


def writer_id() -> str:
    """``<host>-<pid>``: who writes a temporary file (the host name reduced to ``[A-Za-z0-9_]``)."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


_TEMP_RE = re.compile(r"^\.(?P<target>.+?)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[^.]*\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def temporary_owner(name: str) -> Optional[Tuple[str, int]]:
    """(host, pid) of the writer of a temporary file made by :func:`atomic_write`; None if the
    name is not one (e.g. an older unnamed temporary)."""
    m = _TEMP_RE.match(name)
    return (m.group("host"), int(m.group("pid"))) if m else None


def stale_temporaries(folder: str) -> List[str]:
    """Names of the temporaries of :func:`atomic_write` in ``folder`` that nobody is writing any
    more: this process's own (an interrupted save) and those of dead processes of this host.
    A live writer's (another run in the same folder) and another host's are not listed: a pid
    says nothing about a process on another machine."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    me = writer_id()
    host = me.rsplit("-", 1)[0]
    stale = []
    for n in names:
        owner = temporary_owner(n)
        if owner is None:
            continue  # not named by atomic_write: someone else's
        if f"{owner[0]}-{owner[1]}" != me and (owner[0] != host or _pid_alive(owner[1])):
            continue
        stale.append(n)
    return stale


class _WriteErrorRecorder:
    """Keeps the ``OSError`` a file write raised: torch's writer turns it into a
    ``RuntimeError: [enforce fail at inline_container.cc] ... file write failed`` that hides
    the cause (ENOSPC, EDQUOT, EIO)."""

    def __init__(self):
        self.error: Optional[OSError] = None

    def wrap(self, f):
        recorder = self

        class _File:
            def __getattr__(self, name):
                return getattr(f, name)

            def write(self, b):
                try:
                    return f.write(b)
                except OSError as e:
                    recorder.error = e
                    raise

        return _File()


def _os_error_in_chain(e: BaseException) -> Optional[OSError]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _write_error_message(path: str, folder: str, cause: OSError) -> str:
    what = os.strerror(cause.errno) if cause.errno else str(cause)
    try:
        st = os.statvfs(folder)
        free = f"; {st.f_bavail * st.f_frsize / 2**20:.1f} MiB free there now"
    except OSError:
        free = ""
    hint = " Free some space or point train.output_dir at a larger disk." if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"cannot write checkpoint {path}: {what} (errno {cause.errno}){free}; the previous checkpoint is untouched.{hint}"

