"""Test support: run a training script with one checkpoint write stopped half-way.

    python tests/helpers/paused_checkpoint_write.py NAME MARKER SCRIPT [ARGS...]

runs SCRIPT (``tools/lazyconfig_train_net.py``) with ARGS in this process, as ``__main__``.
When its ``ITPNCheckpointer`` saves checkpoint NAME (e.g. ``model_0000005``), the temporary
file stops growing after 4 KiB: what was written is flushed to disk, MARKER is created and the
process sleeps until it is killed. A test waits for MARKER and kills the process in the middle
of a checkpoint write, deterministically. The patch lives in this process only: single-process
runs (``--num-gpus 1``), whose training runs in the launching process.
"""
import os
import runpy
import sys
import time

import itpn_d2.checkpoint.checkpointer as checkpointer


class PausingWriter:
    """A file whose writes stop for good after ``after_bytes`` bytes (flushed, ``marker`` created)."""

    def __init__(self, f, marker: str, after_bytes: int = 4096):
        self.f, self.marker, self.after_bytes, self.n = f, marker, after_bytes, 0

    def write(self, b):
        r = self.f.write(b)
        self.n += len(b)
        if self.n >= self.after_bytes:
            self.f.flush()
            os.fsync(self.f.fileno())
            with open(self.marker, "w") as m:
                m.write(str(os.getpid()))
            while True:
                time.sleep(1)
        return r

    def flush(self):
        self.f.flush()


def pause_checkpoint_write(name: str, marker: str) -> None:
    """Make the checkpointer's write of ``<name>.pth`` go through a :class:`PausingWriter`."""
    atomic_write = checkpointer.atomic_write

    def pausing_atomic_write(path, write_fn, **kwargs):
        if os.path.basename(path) == f"{name}.pth":
            return atomic_write(path, lambda f: write_fn(PausingWriter(f, marker)), **kwargs)
        return atomic_write(path, write_fn, **kwargs)

    checkpointer.atomic_write = pausing_atomic_write


if __name__ == "__main__":
    name, marker, script, *args = sys.argv[1:]
    pause_checkpoint_write(name, marker)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` would have it
    runpy.run_path(script, run_name="__main__")
