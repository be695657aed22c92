"""The machine and software a measurement ran on, as ``tools/gpu_check.py`` records them in its JSON."""
import os
import platform
import socket
import subprocess

from itpn_d2.utils.checkout import REPO_ROOT

__all__ = ["machine_info", "versions"]


def _cmd_out(cmd, empty=None):
    # the stripped output of a helper command run in the checkout (``empty`` when it prints nothing),
    # None when it is absent or fails
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or empty


def machine_info():
    """Hostname, CPU, cores, RAM, and the GPU (name, memory, compute capability, driver, CUDA, cuDNN)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
            ram = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info = {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": ram,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "gpu_memory_gib": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "driver": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _cmd_out(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return info


def versions():
    """Python and the packages the figures depend on (None when not installed), and the git commit."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "detectron2", "timm", "fvcore", "mmpretrain", "mmengine", "mmcv-lite"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if out["detectron2"] is None:  # a source build may carry no distribution metadata
        try:
            import detectron2

            out["detectron2"] = getattr(detectron2, "__version__", None)
        except ImportError:
            pass
    out["git_commit"] = _cmd_out(["git", "rev-parse", "HEAD"])
    # a copy of the tree without .git (or without git) knows neither: None, not "clean"
    status = _cmd_out(["git", "status", "--porcelain", "--untracked-files=no"], empty="") if out["git_commit"] else None
    out["git_dirty"] = None if status is None else bool(status)
    return out
