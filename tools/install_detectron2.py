#!/usr/bin/env python
"""Make ``import detectron2`` work in the current Python environment. Idempotent.

* If detectron2 already imports (e.g. the user's own source build), keep it.
* Otherwise install the registry package ``sal-detectron2==0.7.2`` (upstream
  detectron2 a59f0563, pure Python, wheel tagged cp310 only) into this
  interpreter's site-packages with pip's cross-version ``--target`` install.
* Remove what that wheel brings that must not stay: its compiled
  ``detectron2/_C.cpython-310-*.so`` (built for another Python and torch;
  detectron2 falls back to Python ops without it) and its top-level ``tools``
  package (it would shadow this repository's ``tools/`` scripts).
* Print which detectron2 is in use and where; exit non-zero with a clear
  message if it still does not import.

Options (for a machine without internet, see ``tools/gpu_bundle.py``):
``--find-links DIR`` installs from the wheel in DIR (pip ``--no-index``);
``--target DIR`` installs into DIR instead of this interpreter's site-packages
(DIR must then be on ``PYTHONPATH`` for anything that imports detectron2).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

PIN = "sal-detectron2==0.7.2"


def _probe(extra_path=None):
    """(ok, version, path or error) of detectron2, imported in a clean subprocess (with
    ``extra_path`` first on its ``PYTHONPATH``)."""
    code = "import detectron2, os; print(detectron2.__version__); print(os.path.dirname(detectron2.__file__))"
    env = None
    if extra_path:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, os.environ.get("PYTHONPATH")) if p))
    # Run outside the repository so a local folder cannot shadow site-packages.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.expanduser("~"),
                       env=env)
    if r.returncode == 0:
        version, path = r.stdout.strip().splitlines()[-2:]
        return True, version, path
    return False, None, (r.stderr.strip().splitlines() or ["(no output)"])[-1]


def _cleanup(purelib: str) -> None:
    for so in glob.glob(os.path.join(purelib, "detectron2", "_C.cpython-310-*.so")):
        if sys.version_info[:2] != (3, 10):
            print(f"[install_detectron2] removing {so} (compiled for CPython 3.10 and another torch)")
            os.remove(so)
    # The wheel's top-level `tools` package: remove only if sal-detectron2 recorded it.
    tools_dir = os.path.join(purelib, "tools")
    for record in glob.glob(os.path.join(purelib, "sal_detectron2-*.dist-info", "RECORD")):
        with open(record) as f:
            owns_tools = any(line.startswith("tools/") for line in f)
        if owns_tools and os.path.isdir(tools_dir):
            print(f"[install_detectron2] removing {tools_dir} (sal-detectron2's scripts; would shadow ./tools)")
            shutil.rmtree(tools_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Make `import detectron2` work (see the module docstring).")
    p.add_argument("--target", default=None, help="install into this folder (default: site-packages)")
    p.add_argument("--find-links", default=None, metavar="DIR", help="install offline from the wheel in DIR")
    args = p.parse_args(argv)
    purelib = os.path.abspath(args.target) if args.target else sysconfig.get_paths()["purelib"]
    ok, version, where = _probe(args.target and purelib)
    if ok:
        print(f"[install_detectron2] detectron2 {version} already importable from {where}; keeping it")
    else:
        print(f"[install_detectron2] detectron2 does not import ({where}); installing {PIN} into {purelib}")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", purelib,
               "--python-version", "3.10", "--implementation", "cp", "--only-binary=:all:", PIN]
        if args.find_links:
            cmd[4:4] = ["--no-index", "--find-links", os.path.abspath(args.find_links)]
        r = subprocess.run(cmd)
        if r.returncode != 0:
            print(f"[install_detectron2] ERROR: `{' '.join(cmd)}` failed (exit {r.returncode})", file=sys.stderr)
            return 1
    _cleanup(purelib)
    ok, version, where = _probe(args.target and purelib)
    if not ok:
        print(
            f"[install_detectron2] ERROR: detectron2 still does not import: {where}\n"
            "  Install its runtime dependencies first (`pip install -e .` in this repository),\n"
            "  or build detectron2 from source: https://detectron2.readthedocs.io/en/latest/tutorials/install.html",
            file=sys.stderr,
        )
        return 1
    print(f"[install_detectron2] using detectron2 {version} from {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
