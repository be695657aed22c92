"""``tools/gpu_bundle.py``: the wheels for an offline GPU machine and their install there."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import json
import textwrap

import pytest

from tests.helpers import REPO_ROOT


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_bundle", os.path.join(REPO_ROOT, "tools", "gpu_bundle.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_bundle = _load_tool()


def _runtime_requirements(dist: str):
    """Names of ``dist``'s requirements that apply here (no extras, markers true)."""
    from packaging.requirements import Requirement

    out = []
    for text in importlib.metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req.name)
    return out


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_bundle_and_the_assumed_image_cover_every_runtime_requirement():
    # A requirement added to setup.py (or brought by detectron2) without a place in the bundle
    # would surface only on the GPU machine, after its minutes have started.
    covered = {gpu_bundle._norm(n) for n in (*gpu_bundle.BUNDLE, *gpu_bundle.ASSUMED_PRESENT)}
    ours = _runtime_requirements("itpn_d2")
    assert ours, "itpn_d2's metadata lists no requirement: is the package installed (pip install -e .)?"
    missing = sorted(n for n in ours if gpu_bundle._norm(n) not in covered)
    assert not missing, f"in setup.py but neither bundled nor assumed present: {missing}"
    d2_dist = next((d for d in ("sal-detectron2", "detectron2") if _installed(d)), None)
    assert d2_dist, "no detectron2 distribution installed (tools/install_detectron2.py)"
    d2 = _runtime_requirements(d2_dist)
    missing = sorted(n for n in d2 if gpu_bundle._norm(n) not in covered)
    assert not missing, f"detectron2 needs these, neither bundled nor assumed present: {missing}"


def test_find_wheel_matches_normalised_names_and_versions(tmp_path):
    for name in ("hydra_core-1.3.8-py3-none-any.whl", "antlr4_python3_runtime-4.9.3-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert gpu_bundle.find_wheel(str(tmp_path), "hydra-core", "1.3.8").endswith("hydra_core-1.3.8-py3-none-any.whl")
    assert gpu_bundle.find_wheel(str(tmp_path), "antlr4-python3-runtime", None)
    assert gpu_bundle.find_wheel(str(tmp_path), "hydra-core", "1.3.7") is None
    assert gpu_bundle.find_wheel(str(tmp_path), "omegaconf", None) is None
    (tmp_path / "a.whl").write_bytes(b"")  # not a PEP 427 name: ignored, not a crash
    (tmp_path / "fvcore-0.1.5.post20221221-py3-none-any.whl").write_bytes(b"")
    assert gpu_bundle.find_wheel(str(tmp_path), "fvcore", "0.1.5.post20221221")


@pytest.mark.parametrize("name, python, fits", [
    ("omegaconf-2.3.1-py3-none-any.whl", "3.12", True),
    ("mat4py-0.6.0-py2.py3-none-any.whl", "3.12", True),
    ("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl", "3.12", True),
    ("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl", "3.13", True),  # abi3: this and later
    ("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl", "3.11", False),
    ("pycocotools-2.0.11-cp311-cp311-manylinux2014_x86_64.whl", "3.12", False),
])
def test_a_kept_wheel_must_fit_the_target_python(name, python, fits):
    assert gpu_bundle._fits(name, python) == fits


def test_install_refuses_a_folder_without_a_bundle(tmp_path):
    with pytest.raises(gpu_bundle.BundleError, match="no bundle in .*gpu_bundle.py build"):
        gpu_bundle.install(str(tmp_path / "empty"), str(tmp_path / "site"))


def test_install_refuses_a_bundle_for_another_python_and_names_the_fix(tmp_path):
    _bundle(tmp_path, python_version="2.7")
    with pytest.raises(gpu_bundle.BundleError, match=r"built for Python 2.7.*--python-version \d"):
        gpu_bundle.install(str(tmp_path / "whl"), str(tmp_path / "site"))


def test_preflight_names_the_module_or_config_that_fails(tmp_path):
    broken = tmp_path / "broken_config.py"
    broken.write_text("from no_such_package_for_the_test import x\n")
    bad = gpu_bundle.preflight(str(tmp_path), ("json", "itpn_d2.modeling", "no_such_module_for_the_test"),
                               ("configs/COCO/mask_rcnn_itpn_tiny_demo.py", str(broken)))
    assert set(bad) == {"no_such_module_for_the_test", str(broken)}, bad
    assert bad["no_such_module_for_the_test"].startswith("ModuleNotFoundError")


def test_preflight_loads_every_config_the_gpu_check_runs():
    from itpn_d2.benchmark import gpu_check

    runs = {gpu_check.PRETRAIN_CONFIG, gpu_check.DET_CONFIG, gpu_check.FINETUNE_CONFIG, gpu_check.SEG_CONFIG}
    assert runs <= set(gpu_bundle.PREFLIGHT_CONFIGS)


def _wheel(tmp_path, dist, version, packages, dest, rename_tag=None):
    """A real (tiny) wheel of ``dist`` holding ``packages`` (each a folder with an __init__.py), built
    offline from a throwaway project; ``rename_tag`` replaces its python tag in the file name."""
    proj = tmp_path / f"proj_{dist}"
    for pkg in packages:
        (proj / pkg).mkdir(parents=True)
        (proj / pkg / "__init__.py").write_text(f"VALUE = {pkg!r}\n")
    (proj / "setup.py").write_text(textwrap.dedent(f"""
        from setuptools import setup
        setup(name={dist!r}, version={version!r}, packages={list(packages)!r})
    """))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                        "--no-build-isolation", "--wheel-dir", str(dest), str(proj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (made,) = [p for p in dest.glob("*.whl") if gpu_bundle._norm(p.name.split("-")[0]) == gpu_bundle._norm(dist)]
    if rename_tag:
        made = made.rename(made.with_name(made.name.replace("-py3-", f"-{rename_tag}-")))
    return made


def _bundle(tmp_path, python_version=None):
    src = tmp_path / "whl"
    (src / "cp310").mkdir(parents=True)
    probe = _wheel(tmp_path, "bundled-probe-pkg", "1.0", ["bundled_probe_pkg"], src)
    d2 = _wheel(tmp_path, "sal-detectron2", "0.7.2", ["detectron2", "tools"], src / "cp310", rename_tag="cp310")
    info = {"python_version": python_version or "{}.{}".format(*sys.version_info[:2]), "bench": False,
            "wheels": [probe.name], "detectron2": [d2.name]}
    (src / "bundle.json").write_text(json.dumps(info))
    return src


def test_install_puts_the_listed_wheels_on_the_target_path_offline(tmp_path):
    # Local wheels stand in for the bundle (no network). detectron2 imports here, so install keeps it.
    src = _bundle(tmp_path)
    _wheel(tmp_path, "unlisted-pkg", "1.0", ["unlisted_pkg"], src)  # in the folder, not in bundle.json
    target = tmp_path / "site"
    gpu_bundle.install(str(src), str(target), log=lambda *_: None)
    assert (target / "bundled_probe_pkg" / "__init__.py").is_file()
    assert not (target / "unlisted_pkg").exists()
    out = subprocess.run([sys.executable, "-c", "import bundled_probe_pkg as p; print(p.VALUE, p.__file__)"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(target)))
    assert "bundled_probe_pkg" in out.stdout and str(target) in out.stdout, out.stdout + out.stderr


def test_install_detectron2_offline_into_a_target_drops_the_wheels_tools(tmp_path, monkeypatch):
    # tools/install_detectron2.py --target/--find-links, where detectron2 does not import yet: the
    # cp310-tagged wheel goes into the target offline, and its top-level `tools` package is removed.
    src = _bundle(tmp_path)
    spec = importlib.util.spec_from_file_location("install_detectron2",
                                                  os.path.join(REPO_ROOT, "tools", "install_detectron2.py"))
    inst = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inst)
    target = tmp_path / "site"
    probes = iter([(False, None, "ModuleNotFoundError: No module named 'detectron2'"), None])

    def probe(extra_path=None):
        first = next(probes)
        if first is not None:
            return first
        assert extra_path == str(target)
        return True, "0.7.2", str(target / "detectron2")

    monkeypatch.setattr(inst, "_probe", probe)
    assert inst.main(["--target", str(target), "--find-links", str(src / "cp310")]) == 0
    assert (target / "detectron2" / "__init__.py").is_file()
    assert not (target / "tools").exists()
