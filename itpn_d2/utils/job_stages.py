"""Stages of a job that runs this repository's tools one after another (``tools/run_main_job.py``).

Each stage is a plain command, printed before it runs so that a user can re-run or change
any one. Its whole output goes to a log file; the console gets the lines worth watching
(losses and ETA, checkpoints loaded and saved, evaluation tables, warnings, errors). A stage
that fails ends the job with the stage's exit status and the end of its log.
"""
import os
import shlex
import subprocess
import sys
import time
from typing import Sequence

__all__ = ["StageFailedError", "run_stage", "worth_showing", "available_cores"]

# Substrings of the lines shown on the console (all lines go to the stage's log).
SHOWN_LINE_KEYS = (
    "eta:", "Loaded ", "re-initialised", "Evaluation results", "|", "AP", "mIoU", "Wrote", "wrote", "WARNING",
    "Error", "Traceback", "Reused", "generated", "skipped", "Saving", "->",
)
# How much of a failed stage's log is echoed to stderr.
FAILED_LOG_TAIL_LINES = 40


class StageFailedError(RuntimeError):
    """A stage's command exited with a non-zero status (``returncode``)."""

    def __init__(self, title: str, returncode: int, log_path: str):
        super().__init__(f"stage '{title}' failed (exit {returncode}); full log: {log_path}")
        self.returncode = returncode


def worth_showing(line: str) -> bool:
    """Progress lines (losses, ETA), checkpoint loading, evaluation tables, warnings and errors."""
    return any(k in line for k in SHOWN_LINE_KEYS) and "Build settings" not in line


def run_stage(title: str, cmd: Sequence[str], log_path: str, *, cwd: str) -> float:
    """Run ``cmd`` from ``cwd`` (with ``cwd`` first on ``PYTHONPATH``), streaming its output
    to ``log_path`` and the lines :func:`worth_showing` to the console. Returns the seconds it
    took; raises :class:`StageFailedError` (after printing the end of the log to stderr)."""
    print(f"\n=== {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=cwd + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        for line in proc.stdout:
            log.write(line)
            if worth_showing(line):
                print("  " + line.rstrip()[:240], flush=True)
        rc = proc.wait()
    took = time.perf_counter() - t0
    if rc != 0:
        error = StageFailedError(title, rc, log_path)
        print(f"\n[main job] {error}", file=sys.stderr)
        with open(log_path) as f:
            sys.stderr.write("".join(f.readlines()[-FAILED_LOG_TAIL_LINES:]))
        raise error
    print(f"=== {title}: done in {took:.0f}s", flush=True)
    return took


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
