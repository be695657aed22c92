#!/usr/bin/env python
"""Run this repository on a machine without internet whose ``python3`` already has torch and
torchvision (a rented GPU box, a cluster node): a folder of wheels built here, installed there.

    python tools/gpu_bundle.py build                      # here, with internet: writes .whl/
    # copy the repository with .whl/ to the machine, then there, offline:
    python3 tools/gpu_bundle.py install --target /tmp/site
    PYTHONPATH=/tmp/site python3 tools/gpu_check.py       # or any tool of this repository

(``make gpu-bundle`` and ``make gpu-check-offline`` are these commands.)

``build`` writes into ``--dest`` (default ``.whl/``, ignored by git):

* one wheel for each runtime dependency that PyTorch images usually lack (:data:`BUNDLE`;
  with ``--bench`` also mmpretrain's, for the reference side of ``tools/benchmark.py``), for
  CPython ``--python-version`` on manylinux x86_64, each at the version installed in the
  environment running ``build`` (the one the tests ran with) or else the pin in the table.
  The index's binary wheel where it has one; else the wheel is built here from the source
  distribution, which must give a pure-Python wheel (fvcore, iopath and antlr4 publish no wheel);
* ``cp310/``: detectron2, the registry's ``sal-detectron2`` (tagged cp310: ``install`` puts it
  in place with ``tools/install_detectron2.py --find-links``, as ``make install`` does online);
* ``bundle.json``: the Python version and the files.

``install`` needs nothing but pip: it installs every wheel of ``--src`` with ``--no-index
--no-deps`` into ``--target``, then detectron2, then imports what the tools import (torch,
torchvision, detectron2 with its model zoo, fvcore, pycocotools, omegaconf, hydra, timm, cv2,
itpn_d2) in a fresh interpreter with ``--target`` on ``PYTHONPATH``, and exits non-zero naming
any that fails: a missing package is found in seconds, not after a GPU has started a job.
Packages the machine already has and a wheel also brings are shadowed by the wheel's copy.
"""
import argparse
import glob
import importlib.metadata
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runtime needs of itpn_d2 and detectron2 that PyTorch GPU images usually lack, with the pin used
# when the environment running `build` does not have the package.
BUNDLE = {
    "fvcore": "0.1.5.post20221221",
    "iopath": "0.1.10",
    "omegaconf": "2.3.1",
    "antlr4-python3-runtime": "4.9.3",  # omegaconf 2.3 accepts 4.9.x only
    "hydra-core": "1.3.8",
    "pycocotools": "2.0.11",
    "yacs": "0.1.8",
    "termcolor": "3.3.0",
    "portalocker": "4.4.2",
    # detectron2.model_zoo imports pkg_resources, which setuptools 81 and later no longer ship
    "setuptools": "80.10.2",
}
# What the bundle counts on the machine having: a PyTorch image's usual packages. `black` is on
# setup.py's list for detectron2's LazyConfig.to_py, which nothing here calls.
ASSUMED_PRESENT = ("torch", "torchvision", "timm", "numpy", "Pillow", "matplotlib", "opencv-python-headless",
                   "tabulate", "cloudpickle", "tqdm", "tensorboard", "packaging", "PyYAML", "black")
# tools/benchmark.py's reference side (setup.py's `bench` extra, installed without dependencies)
BENCH = {
    "mmpretrain": "1.2.0",
    "mmengine": "0.10.7",
    "mmcv-lite": "2.2.0",
    "yapf": None,
    "addict": None,
    "importlib_metadata": None,
    "model-index": None,
    "ordered-set": None,
    "mat4py": None,
    "lazy-importer": None,  # importlib_metadata 9+ needs it
    "platformdirs": None,  # yapf needs it
}
DETECTRON2 = "sal-detectron2==0.7.2"  # as tools/install_detectron2.py
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# imported by `install` to prove the folder complete (module names)
PREFLIGHT = ("torch", "torchvision", "detectron2", "detectron2.model_zoo", "fvcore", "iopath", "pycocotools.coco",
             "omegaconf", "hydra", "yacs", "termcolor", "timm", "cv2", "matplotlib", "tabulate", "cloudpickle",
             "itpn_d2.modeling", "itpn_d2.engine.trainer")
PREFLIGHT_BENCH = ("mmpretrain", "mmengine.config", "mmpretrain.registry")


class BundleError(RuntimeError):
    pass


def wanted(bench: bool = False):
    """[(distribution name, version or None)]: :data:`BUNDLE` (+ :data:`BENCH`), each at the version
    installed here, else the table's pin."""
    out = []
    for name, pin in {**BUNDLE, **(BENCH if bench else {})}.items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = pin
        out.append((name, version))
    return out


def _norm(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. become _)."""
    return "_".join(part for part in name.replace("-", "_").replace(".", "_").split("_") if part).lower()


def find_wheel(folder: str, name: str, version=None):
    """The wheel of ``name`` (at ``version``, when given) in ``folder``, or None."""
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        dist, ver = os.path.basename(path).split("-")[:2]
        if _norm(dist) == _norm(name) and (version is None or ver == version):
            return path
    return None


def _pip(args, log):
    cmd = [sys.executable, "-m", "pip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"  `{' '.join(cmd)}` failed (exit {r.returncode}): "
            + " ".join((r.stderr or r.stdout).strip().splitlines()[-2:]))
    return r.returncode == 0


def build(dest: str = ".whl", python_version: str = "3.12", bench: bool = False, log=print) -> dict:
    """Fill ``dest`` (module docstring); a wheel already there is kept. Returns what ``bundle.json``
    holds; raises :class:`BundleError` naming every package it could not get."""
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    failed = []
    for name, version in wanted(bench):
        spec = f"{name}=={version}" if version else name
        if find_wheel(dest, name, version):
            log(f"[gpu_bundle] {spec}: already in {dest}")
            continue
        binary = ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                  "--implementation", "cp", *platform_args, "--dest", dest, spec]
        if _pip(binary, lambda _msg: None):
            log(f"[gpu_bundle] {spec}: binary wheel from the index")
            continue
        before = set(glob.glob(os.path.join(dest, "*.whl")))
        if not _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", dest, spec], log):
            failed.append(f"{spec} (neither a wheel for CPython {python_version} nor a source distribution)")
            continue
        made = sorted(set(glob.glob(os.path.join(dest, "*.whl"))) - before)
        impure = [m for m in made if not os.path.basename(m).endswith("-none-any.whl")]
        if impure:  # compiled for this machine's Python: useless on another
            for m in impure:
                os.remove(m)
            failed.append(f"{spec} (its source builds a compiled wheel, only for this Python)")
            continue
        log(f"[gpu_bundle] {spec}: built from its source distribution ({', '.join(map(os.path.basename, made))})")
    d2_dir = os.path.join(dest, "cp310")
    os.makedirs(d2_dir, exist_ok=True)
    d2_name, d2_version = DETECTRON2.split("==")
    if find_wheel(d2_dir, d2_name, d2_version):
        log(f"[gpu_bundle] {DETECTRON2}: already in {d2_dir}")
    elif _pip(["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
               "--implementation", "cp", "--dest", d2_dir, DETECTRON2], log):
        log(f"[gpu_bundle] {DETECTRON2}: into {d2_dir}")
    else:
        failed.append(DETECTRON2)
    if failed:
        raise BundleError("could not bundle: " + "; ".join(failed))
    info = {"python_version": python_version, "bench": bench,
            "wheels": sorted(os.path.basename(p) for p in glob.glob(os.path.join(dest, "*.whl"))),
            "detectron2": sorted(os.path.basename(p) for p in glob.glob(os.path.join(d2_dir, "*.whl")))}
    with open(os.path.join(dest, "bundle.json"), "w") as f:
        json.dump(info, f, indent=1)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(dest, "**", "*.whl"), recursive=True))
    log(f"[gpu_bundle] {len(info['wheels']) + len(info['detectron2'])} wheels, {size / 2**20:.1f} MiB in {dest}")
    return info


def preflight(target: str, modules=PREFLIGHT):
    """Import ``modules`` one by one in a fresh interpreter with ``target`` first on ``PYTHONPATH``
    (from the repository root, as the tools run). Returns {module: error} for those that fail."""
    code = "\n".join([
        "import importlib, json, sys",
        "bad = {}",
        "for m in sys.argv[1:]:",
        "    try:",
        "        importlib.import_module(m)",
        "    except Exception as e:",
        "        bad[m] = f'{type(e).__name__}: {e}'",
        "print(json.dumps(bad))",
    ])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if r.returncode != 0:
        return {"(interpreter)": (r.stderr or r.stdout).strip().splitlines()[-1:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def install(src: str = ".whl", target: str = "/tmp/site", log=print) -> None:
    """Install the bundle ``src`` into ``target`` offline, then :func:`preflight`; raises
    :class:`BundleError` with what failed."""
    src, target = os.path.abspath(src), os.path.abspath(target)
    wheels = sorted(glob.glob(os.path.join(src, "*.whl")))
    if not wheels:
        raise BundleError(f"no wheels in {src}: run `python tools/gpu_bundle.py build` on a machine with internet "
                          "and copy the folder here")
    os.makedirs(target, exist_ok=True)
    if not _pip(["install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                 "--target", target, *wheels], log):
        raise BundleError(f"pip could not install the wheels of {src} into {target}")
    log(f"[gpu_bundle] installed {len(wheels)} wheels into {target}")
    r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "install_detectron2.py"), "--target", target,
                        "--find-links", os.path.join(src, "cp310")])
    if r.returncode != 0:
        raise BundleError(f"detectron2 did not install from {os.path.join(src, 'cp310')} (exit {r.returncode})")
    modules = PREFLIGHT
    try:
        with open(os.path.join(src, "bundle.json")) as f:
            if json.load(f).get("bench"):
                modules = PREFLIGHT + PREFLIGHT_BENCH
    except (OSError, ValueError):
        pass
    bad = preflight(target, modules)
    if bad:
        raise BundleError("these do not import with PYTHONPATH=" + target + ": "
                          + "; ".join(f"{m} ({e})" for m, e in bad.items()))
    log(f"[gpu_bundle] every module the tools need imports; now: export PYTHONPATH={target}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="here, with internet: the wheels into --dest")
    b.add_argument("--dest", default=".whl")
    b.add_argument("--python-version", default="3.12", help="the target machine's python3 (default 3.12)")
    b.add_argument("--bench", action="store_true", help="also mmpretrain's packages (the benchmark's reference)")
    i = sub.add_parser("install", help="there, offline: the wheels of --src into --target, then an import check")
    i.add_argument("--src", default=".whl")
    i.add_argument("--target", default="/tmp/site")
    args = p.parse_args(argv)
    try:
        if args.what == "build":
            build(args.dest, args.python_version, args.bench)
        else:
            install(args.src, args.target)
    except BundleError as e:
        print(f"[gpu_bundle] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
