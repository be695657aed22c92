"""itpn_d2: iTPN (integrally pre-trained transformer pyramid networks) on detectron2.

detectron2 itself is not listed: it is either the user's own build or installed by
``tools/install_detectron2.py`` (the registry's ``sal-detectron2`` is tagged cp310
only and needs a special pip call on newer Pythons).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def model_zoo_configs():
    """Ship ``configs/`` inside the package as ``itpn_d2/model_zoo/configs`` (a link in a source
    checkout, a copy where links are not possible), as detectron2's setup.py does, so that
    ``itpn_d2.model_zoo.get_config`` works after a non-editable install."""
    source = os.path.join(HERE, "configs")
    dest = os.path.join(HERE, "itpn_d2", "model_zoo", "configs")
    if os.path.isdir(source) and not os.path.exists(dest):
        if os.path.islink(dest):
            os.unlink(dest)
        try:
            os.symlink(os.path.relpath(source, os.path.dirname(dest)), dest)
        except OSError:
            shutil.copytree(source, dest)
    files = glob.glob(os.path.join(dest, "**", "*.py"), recursive=True)
    return [os.path.relpath(f, os.path.dirname(dest)) for f in files]


setup(
    name="itpn_d2",
    version="0.1.0",
    description="iTPN: HiViT + integrally pre-trained feature pyramid for detectron2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["itpn_d2", "itpn_d2.*"], exclude=["itpn_d2.model_zoo.configs*"]),
    package_data={"itpn_d2.model_zoo": model_zoo_configs()},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "timm>=0.9",
        "pycocotools>=2.0.2",
        # headless: servers and CI have no display; opencv-python works as well.
        "opencv-python-headless",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        # what detectron2 itself imports at run time
        "Pillow>=7.1",
        "matplotlib",
        "termcolor>=1.1",
        "yacs>=0.1.8",
        "tabulate",
        "cloudpickle",
        "tqdm>4.29.0",
        "tensorboard",
        "black",
        "packaging",
        # detectron2.model_zoo imports pkg_resources, removed in setuptools 81
        "setuptools<81",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # tools/benchmark.py's reference side. Install with --no-deps (see README), or pip pulls
        # a second OpenCV and a compiled mmcv: the reference runs on its pure-Python parts.
        "bench": [
            "mmpretrain==1.2.0", "mmengine==0.10.7", "mmcv-lite==2.2.0", "yapf", "addict", "rich",
            "importlib_metadata", "model-index", "ordered-set", "mat4py", "einops",
        ],
    },
)
