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

``install`` needs nothing but pip: it checks that the bundle was built for this Python, installs
the wheels ``bundle.json`` lists with ``--no-index --no-deps`` into ``--target``, then detectron2,
then, in a fresh interpreter with ``--target`` first on ``PYTHONPATH``, imports what the tools
import (torch, torchvision, detectron2 with its model zoo, fvcore, pycocotools, omegaconf, hydra,
timm, cv2, itpn_d2; mmpretrain for a ``--bench`` bundle) and loads the configs the GPU check runs,
and exits non-zero naming any that fails: a missing package is found in seconds, not after a GPU
has started a job. Packages the machine already has and a wheel also brings are shadowed by the
wheel's copy.
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
# loaded by `install` too: the configs tools/gpu_check.py runs (itpn_d2.benchmark.gpu_check, .segmentation)
PREFLIGHT_CONFIGS = ("configs/pretrain/mim_itpn_base_mmpretrain_800ep.py", "configs/COCO/mask_rcnn_itpn_base_1x.py",
                     "configs/COCO/mask_rcnn_itpn_tiny_demo.py", "configs/ADE20K/uper_itpn_base_160k.py")


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


def _wheel_name_version(path: str):
    """(project, version) from a wheel file name (PEP 427: name-version[-build]-python-abi-platform.whl),
    or None for a name that does not follow it."""
    parts = os.path.basename(path)[:-len(".whl")].split("-")
    return (parts[0], parts[1]) if len(parts) in (5, 6) else None


def _same_version(a: str, b: str) -> bool:
    try:
        from packaging.version import Version

        return Version(a) == Version(b)
    except Exception:  # noqa: BLE001 - no packaging, or not a PEP 440 version: compare the text
        return a == b


def wheels_of(folder: str, name: str):
    """Every wheel of the project ``name`` in ``folder``."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        nv = _wheel_name_version(path)
        if nv and _norm(nv[0]) == _norm(name):
            out.append(path)
    return out


def find_wheel(folder: str, name: str, version=None):
    """The wheel of ``name`` (at ``version``, when given) in ``folder``, or None."""
    for path in wheels_of(folder, name):
        if version is None or _same_version(_wheel_name_version(path)[1], version):
            return path
    return None


def _fits(wheel: str, python_version: str) -> bool:
    """Whether ``wheel`` installs on CPython ``python_version`` (its python tag: py3, cp3, or this
    version's cpXY, the last also for abi3 wheels of an older cpXY)."""
    tags = os.path.basename(wheel)[:-len(".whl")].split("-")[-3]
    major, minor = (int(x) for x in python_version.split(".")[:2])
    for tag in tags.split("."):
        if tag in ("py3", "py2.py3", f"py{major}", f"cp{major}"):
            return True
        if tag.startswith("cp") and tag[2:].isdigit():
            v = int(tag[3:]) if tag[2] == str(major) and len(tag) > 3 else None
            abi = os.path.basename(wheel).split("-")[-2]
            if v == minor or (abi == "abi3" and v is not None and v <= minor):
                return True
    return False


def _pip(args, log):
    cmd = [sys.executable, "-m", "pip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"  `{' '.join(cmd)}` failed (exit {r.returncode}): "
            + " ".join((r.stderr or r.stdout).strip().splitlines()[-2:]))
    return r.returncode == 0


def build(dest: str = ".whl", python_version: str = "3.12", bench: bool = False, log=print) -> dict:
    """Fill ``dest`` (module docstring); a wheel already there at the wanted version, for that
    Python, is kept, other wheels of the same project are removed. Returns what ``bundle.json``
    holds (the wheels ``install`` will take, no others); raises :class:`BundleError` naming every
    package it could not get."""
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    failed, chosen = [], []
    for name, version in wanted(bench):
        spec = f"{name}=={version}" if version else name
        kept = find_wheel(dest, name, version)
        if kept and _fits(kept, python_version):
            log(f"[gpu_bundle] {spec}: already in {dest}")
            chosen.append(kept)
            continue
        for stale in wheels_of(dest, name):  # another version, or for another Python: pip would see two
            os.remove(stale)
        binary = ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                  "--implementation", "cp", *platform_args, "--dest", dest, spec]
        if _pip(binary, lambda _msg: None) and wheels_of(dest, name):
            log(f"[gpu_bundle] {spec}: binary wheel from the index")
            chosen.append(wheels_of(dest, name)[-1])
            continue
        before = set(glob.glob(os.path.join(dest, "*.whl")))
        if not _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", dest, spec], log):
            failed.append(f"{spec} (neither a wheel for CPython {python_version} nor a source distribution)")
            continue
        made = sorted(set(glob.glob(os.path.join(dest, "*.whl"))) - before)
        impure = [m for m in made if not os.path.basename(m).endswith("-none-any.whl")]
        if impure or not made:  # compiled for this machine's Python: useless on another
            for m in made:
                os.remove(m)
            failed.append(f"{spec} (its source builds a compiled wheel, only for this Python)")
            continue
        log(f"[gpu_bundle] {spec}: built from its source distribution ({', '.join(map(os.path.basename, made))})")
        chosen.extend(made)
    d2_dir = os.path.join(dest, "cp310")
    os.makedirs(d2_dir, exist_ok=True)
    d2_name, d2_version = DETECTRON2.split("==")
    d2 = find_wheel(d2_dir, d2_name, d2_version)
    if d2:
        log(f"[gpu_bundle] {DETECTRON2}: already in {d2_dir}")
    elif _pip(["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
               "--implementation", "cp", "--dest", d2_dir, DETECTRON2], log):
        d2 = find_wheel(d2_dir, d2_name, d2_version)
        log(f"[gpu_bundle] {DETECTRON2}: into {d2_dir}")
    if not d2:
        failed.append(DETECTRON2)
    if failed:
        raise BundleError("could not bundle: " + "; ".join(failed))
    info = {"python_version": python_version, "bench": bench,
            "wheels": sorted(os.path.basename(p) for p in chosen), "detectron2": [os.path.basename(d2)]}
    with open(os.path.join(dest, "bundle.json"), "w") as f:
        json.dump(info, f, indent=1)
    size = sum(os.path.getsize(p) for p in chosen + [d2])
    log(f"[gpu_bundle] {len(chosen) + 1} wheels, {size / 2**20:.1f} MiB in {dest} (listed in bundle.json)")
    return info


def read_bundle(src: str) -> dict:
    """``src/bundle.json`` (what ``build`` wrote); a :class:`BundleError` naming the file when it is
    missing, unreadable, or lists a wheel that is not there."""
    path = os.path.join(src, "bundle.json")
    try:
        with open(path) as f:
            info = json.load(f)
        listed = [os.path.join(src, w) for w in info["wheels"]] + [os.path.join(src, "cp310", w)
                                                                   for w in info["detectron2"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path}: not a bundle written by `python tools/gpu_bundle.py build` "
                          f"({type(e).__name__}: {e})") from e
    missing = [p for p in listed if not os.path.isfile(p)]
    if missing:
        raise BundleError(f"{path} lists wheels that are not there: {missing}")
    return info


def preflight(target: str, modules=PREFLIGHT, configs=PREFLIGHT_CONFIGS):
    """In a fresh interpreter with ``target`` first on ``PYTHONPATH``, from the repository root as
    the tools run: import ``modules`` one by one, then load each LazyConfig of ``configs`` (they
    import their own modules and detectron2's model zoo, which reads through ``pkg_resources``).
    Returns {module or config: error} for those that fail."""
    code = "\n".join([
        "import importlib, json, sys",
        "bad = {}",
        "modules, configs = json.loads(sys.argv[1])",
        "for m in modules:",
        "    try:",
        "        importlib.import_module(m)",
        "    except Exception as e:",
        "        bad[m] = f'{type(e).__name__}: {e}'",
        "for c in configs:",
        "    try:",
        "        from detectron2.config import LazyConfig",
        "        LazyConfig.load(c)",
        "    except Exception as e:",
        "        bad[c] = f'{type(e).__name__}: {e}'",
        "print(json.dumps(bad))",
    ])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", code, json.dumps([list(modules), list(configs)])],
                       capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if r.returncode != 0:
        return {"(interpreter)": ((r.stderr or r.stdout).strip().splitlines() or ["no output"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def install(src: str = ".whl", target: str = "/tmp/site", log=print) -> None:
    """Install the bundle ``src`` (the wheels its ``bundle.json`` lists) into ``target`` offline,
    then detectron2, then :func:`preflight`; raises :class:`BundleError` with what failed."""
    src, target = os.path.abspath(src), os.path.abspath(target)
    if not os.path.isfile(os.path.join(src, "bundle.json")):
        raise BundleError(f"no bundle in {src}: run `python tools/gpu_bundle.py build` on a machine with internet "
                          "and copy the folder here")
    info = read_bundle(src)
    here = "{}.{}".format(*sys.version_info[:2])
    if info.get("python_version") != here:
        raise BundleError(f"{os.path.join(src, 'bundle.json')} was built for Python {info.get('python_version')}, "
                          f"this is {here}: rebuild with `python tools/gpu_bundle.py build --python-version {here}`")
    wheels = [os.path.join(src, w) for w in info["wheels"]]
    os.makedirs(target, exist_ok=True)
    if not _pip(["install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                 "--target", target, *wheels], log):
        raise BundleError(f"pip could not install the wheels of {src} into {target}")
    log(f"[gpu_bundle] installed {len(wheels)} wheels into {target}")
    r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "install_detectron2.py"), "--target", target,
                        "--find-links", os.path.join(src, "cp310")])
    if r.returncode != 0:
        raise BundleError(f"detectron2 did not install from {os.path.join(src, 'cp310')} (exit {r.returncode})")
    bad = preflight(target, PREFLIGHT + (PREFLIGHT_BENCH if info.get("bench") else ()))
    if bad:
        raise BundleError(f"with {target} on PYTHONPATH these fail: " + "; ".join(f"{m} ({e})" for m, e in bad.items()))
    log(f"[gpu_bundle] every module the tools import and the GPU check's configs load; now: "
        f"export PYTHONPATH={target}${{PYTHONPATH:+:$PYTHONPATH}}")


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
