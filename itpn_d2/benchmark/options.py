"""What a benchmark run measures and how: :class:`BenchmarkOptions` (one field per flag of
``tools/benchmark.py``), the dtypes it times (:func:`usable_dtypes`) and the configs it reads
(:func:`load_cfg`)."""
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from itpn_d2.config import load_config
from itpn_d2.utils.checkout import REPO_ROOT
from itpn_d2.utils.precision import native_low_precision

__all__ = ["DTYPES", "BenchmarkOptions", "BenchmarkOptionError", "usable_dtypes", "load_cfg"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BenchmarkOptionError(ValueError):
    """An option names something unknown (a ``what``, a dtype)."""


@dataclass
class BenchmarkOptions:
    """The settings of one benchmark run; ``tools/benchmark.py`` documents each as a flag.

    ``batch`` / ``det_batch`` / ``warmup`` / ``reps`` None mean the device's defaults
    (:func:`itpn_d2.benchmark.run_benchmark`); ``device`` None means CUDA when available.
    """

    what: str = "pretrain"
    config: str = "configs/pretrain/mim_itpn_base_mmpretrain_800ep.py"
    det_config: str = "configs/COCO/mask_rcnn_itpn_base_1x.py"
    finetune_configs: str = (
        "configs/COCO/mask_rcnn_itpn_tiny_demo.py,configs/ADE20K/uper_itpn_tiny_demo_frozen.py,"
        "configs/ADE20K/uper_itpn_tiny_demo.py"
    )
    arch: Optional[str] = None
    batch: Optional[int] = None
    workers: int = 2
    loop_images: int = 64
    img: int = 224
    mask_ratio: float = 0.75
    dtypes: str = "fp32,bf16"
    reference: str = "auto"
    det_batch: Optional[int] = None
    det_sizes: str = "800x1216,1024x1024"
    det_bf16_heads: str = "bf16"
    warmup: Optional[int] = None
    reps: Optional[int] = None
    quick: bool = False
    device: Optional[str] = None
    compile: bool = False
    force_bf16: bool = False
    peak_tflops: Optional[float] = None
    threads: Optional[int] = None
    optimizer: str = "recipe"
    no_memory: bool = False
    memory_only: bool = False
    profile: Optional[str] = None
    opts: List[str] = field(default_factory=list)


def usable_dtypes(args, device, tag):
    """The dtypes of ``args.dtypes`` to time on ``device``; one emulated there (no native kernels)
    is left out with a message unless ``args.force_bf16``."""
    out = []
    for d in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if d not in DTYPES:
            raise BenchmarkOptionError(f"--dtypes: unknown {d!r}; choose from {sorted(DTYPES)}")
        if not native_low_precision(device, DTYPES[d]) and not args.force_bf16:
            print(f"[{tag}] {d}: SKIPPED: this CPU has no native {d} kernels (oneDNN: no AVX-512 bf16/AMX), "
                  f"{d} matmuls are emulated (< 1 GFLOP/s); --force-bf16 runs it anyway")
            continue
        out.append(d)
    return out


def load_cfg(path, args):
    """The config at ``path`` with ``--arch`` applied, then the checked ``--opts``."""
    from itpn_d2.modeling import hivit_arch

    def set_arch(cfg):
        if args.arch:
            parts = args.arch.split(",")
            cfg.model.backbone.net.update(hivit_arch(parts[0], parts[1] if len(parts) > 1 else "official"))

    return load_config(path if os.path.isabs(path) else os.path.join(REPO_ROOT, path), args.opts, edit=set_arch)
