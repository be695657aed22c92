"""``tools/gpu_bundle.py``: the wheels for an offline GPU machine and their install there."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
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
    d2_dist = next(d for d in ("sal-detectron2", "detectron2") if _installed(d))
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


def test_install_refuses_a_folder_without_wheels(tmp_path):
    with pytest.raises(gpu_bundle.BundleError, match="no wheels in .*gpu_bundle.py build"):
        gpu_bundle.install(str(tmp_path / "empty"), str(tmp_path / "site"))


def test_preflight_names_the_module_that_does_not_import(tmp_path):
    bad = gpu_bundle.preflight(str(tmp_path), ("json", "itpn_d2.modeling", "no_such_module_for_the_test"))
    assert set(bad) == {"no_such_module_for_the_test"}
    assert bad["no_such_module_for_the_test"].startswith("ModuleNotFoundError")


def test_install_puts_the_wheels_on_the_target_path_offline(tmp_path):
    # A local wheel stands in for the bundle (no network): `install` must put it into --target with
    # pip's --no-index, keep the detectron2 already importable here, and pass the import check.
    proj = tmp_path / "proj"
    (proj / "bundled_probe_pkg").mkdir(parents=True)
    (proj / "bundled_probe_pkg" / "__init__.py").write_text("VALUE = 42\n")
    (proj / "setup.py").write_text(textwrap.dedent("""
        from setuptools import setup
        setup(name="bundled-probe-pkg", version="1.0", packages=["bundled_probe_pkg"])
    """))
    src = tmp_path / "whl"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                        "--no-build-isolation", "--wheel-dir", str(src), str(proj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (src / "cp310").mkdir()
    target = tmp_path / "site"
    gpu_bundle.install(str(src), str(target), log=lambda *_: None)
    assert (target / "bundled_probe_pkg" / "__init__.py").is_file()
    out = subprocess.run([sys.executable, "-c", "import bundled_probe_pkg as p; print(p.VALUE, p.__file__)"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(target)))
    assert out.stdout.split()[0] == "42" and str(target) in out.stdout, out.stdout + out.stderr
