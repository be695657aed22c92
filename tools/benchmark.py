#!/usr/bin/env python
"""Speed and memory of iTPN pre-training and detection, side by side with mmpretrain's iTPN.

Pre-training (``--what pretrain``): images/s of a whole training step (forward,
backward, AdamW step) at mask ratio 0.75 for a pre-training config, in fp32 and
under bf16 autocast. With ``--reference`` (default on for pixel configs) the same
step of mmpretrain 1.2.0's ``itpn-pixel_hivit-base-p16_8xb512-amp-coslr-800e_in1k``
model runs in the same process, rep by rep interleaved with ours, with the same
batch, resolution, mask ratio, optimizer and dtype; the tool prints the speed ratio
ours/reference, achieved GFLOP/s of both (FLOPs of one step from
``torch.utils.flop_counter``, 2 per multiply-add, forward + backward) and their
fraction of a 2048x2048 matmul's rate measured in the same run for the same dtype
(8192x8192 on a GPU). On a GPU under bf16/fp16 it also prints model FLOPs utilisation:
those step FLOPs per second over the card's dense tensor-core peak from its datasheet
(built-in for A100/H100/H200, ``--peak-tflops`` for others).
If mmpretrain is not installed, our side still runs and the reference is reported
as unavailable.

Training loop (``--what loop``): images/s of the pre-training step exactly as
``tools/lazyconfig_train_net.py`` runs it: the config's resumable loader over a folder of
generated JPEG-free PNGs (decode, RandomResizedCrop, flip in ``--workers`` DataLoader
workers, masks drawn there too where the code supports it), the trainer from
``build_trainer`` (finite check, metrics) and the config's optimizer. The step time
includes waiting for the loader, the host-to-device copy and the model's mask handling.

Detection (``--what det``): training-step time (forward, backward, AdamW) and
inference latency of a Mask R-CNN config on synthetic images at detectron2's usual
sizes (short side 800 -> 800x1216 padded, and 1024x1024).

Optimizers: each side's own recipe (``--optimizer recipe``, default): ours from the
pre-training config (``--opts optimizer.fused=True`` for the fused AdamW kernel), the
reference from its config's ``optim_wrapper`` (AdamW + ``paramwise_cfg``) through mmengine;
``--optimizer plain`` gives both the same 2-group torch AdamW.

bf16/fp16 on a CPU without native kernels (no AVX-512 bf16 / AMX: oneDNN reports it)
is skipped with a message: every bf16 matmul and convolution there is emulated at < 1
GFLOP/s, so a base-model step would take hours (``--force-bf16`` runs it anyway).

Peak memory: GPU ``torch.cuda.max_memory_allocated`` minus the other side's live tensors
(model, gradients, optimizer state), so each side's figure is its own; CPU the process's
resident-set high-water mark during one step (both models live in one process, so on CPU
it is a process figure, not a per-side one).

The pre-training step of ``--what pretrain`` feeds the model what the loader gives it in
training: uint8 images on the host with each sample's mask drawn beforehand (as the
DataLoader workers do), so the step includes the pinned host-to-device copy. FLOPs (and so
MFU) are counted with activation checkpointing switched off: recomputation is work the
card does, not model FLOPs. Detection heads run under autocast as in training
(``--det-bf16-heads fp32`` for the CPU-friendly variant). Detection also prints "peak allocated": live
tensor bytes at their peak from the profiler's allocation events, the quantity
``max_memory_allocated`` reports on a GPU, so a CPU run estimates what a card needs
(``--opts model.backbone.net.use_act_checkpoint=True`` for activation checkpointing).

Examples::

    # the README table: ours (mmpretrain layout) vs mmpretrain, batch 4, 224 px, fp32 + bf16
    python tools/benchmark.py --what pretrain --batch 4 --dtypes fp32,bf16 --opts optimizer.fused=True
    # detection at 800 and 1024 px, batch 1, few reps (CPU)
    python tools/benchmark.py --what det --quick
    # memory of the base detector at 1024x1024, batch 2, with activation checkpointing
    python tools/benchmark.py --what det --memory-only --det-batch 2 --det-sizes 1024x1024 --dtypes fp32 \
        --opts model.backbone.net.use_act_checkpoint=True
    # anything on a tiny model (tests): any config key can be overridden
    python tools/benchmark.py --quick --what pretrain,det --arch tiny --img 64 --det-sizes 128x128

Install the reference (optional extra ``bench``)::

    pip install --no-deps mmpretrain==1.2.0 mmengine==0.10.7 mmcv-lite==2.2.0 \
        addict yapf rich termcolor einops modelindex mat4py
"""
import argparse
import functools
import os
import platform
import sys
import time
import traceback
from typing import Iterable

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from itpn_d2.config import add_opts_argument, load_config  # noqa: E402
from itpn_d2.engine.compile import compile_modules  # noqa: E402
from itpn_d2.utils.flops import count_flops, datasheet_tflops, matmul_rate  # noqa: E402
from itpn_d2.utils.memory import live_tensor_bytes, peak_allocated, peak_memory  # noqa: E402
from itpn_d2.utils.precision import autocast_ctx, native_low_precision  # noqa: E402
from itpn_d2.utils.timing import format_summary, summarize, sync, time_interleaved, time_reps  # noqa: E402

REFERENCE_CONFIG = "itpn-pixel_hivit-base-p16_8xb512-amp-coslr-800e_in1k"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="pretrain", help="comma list of: pretrain, loop, det")
    p.add_argument("--config", default="configs/pretrain/mim_itpn_base_mmpretrain_800ep.py",
                   help="pre-training LazyConfig (ours)")
    p.add_argument("--det-config", default="configs/COCO/mask_rcnn_itpn_base_1x.py", help="detection LazyConfig")
    p.add_argument("--arch", default=None,
                   help="override model.backbone.net with hivit_arch(SIZE[,LAYOUT]), e.g. 'tiny' or 'base,official'")
    p.add_argument("--batch", type=int, default=None,
                   help="pre-training batch (default: 512 on a GPU, the release's per-GPU batch of its 8xb512 "
                        "recipe; 4 on a CPU)")
    p.add_argument("--workers", type=int, default=2, help="--what loop: DataLoader workers")
    p.add_argument("--loop-images", type=int, default=64, help="--what loop: images in the generated folder")
    p.add_argument("--img", type=int, default=224, help="pre-training resolution")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (autocast)")
    p.add_argument("--reference", choices=["auto", "on", "off"], default="auto",
                   help="run mmpretrain's iTPN beside ours (auto: when comparable and installed)")
    p.add_argument("--det-batch", type=int, default=None, help="detection batch (default 2 GPU, 1 CPU)")
    p.add_argument("--det-sizes", default="800x1216,1024x1024", help="HxW list for detection")
    p.add_argument("--det-bf16-heads", choices=["fp32", "bf16"], default="bf16",
                   help="under bf16/fp16 autocast, run the detection heads under autocast as training does "
                        "(bf16, default) or in fp32 (faster on CPUs without native bf16)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="1 warm-up, 3 reps (pretrain) / 1+1 (det)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our backbone and decoders in place, as train.compile.enabled=True does")
    p.add_argument("--force-bf16", action="store_true",
                   help="run bf16 even on a CPU without native bf16 (emulated: 100x+ slower)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="GPU: the card's dense bf16/fp16 peak for MFU, when it is not in the built-in table")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--optimizer", choices=["recipe", "plain"], default="recipe",
                   help="recipe: each side's own config (AdamW + its param groups); "
                        "plain: the same 2-group torch AdamW on both sides")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--memory-only", action="store_true",
                   help="detection: no timing; one warm-up training step (optimizer state exists), "
                        "then peak allocated of one training and one inference step "
                        "(on a GPU also max_memory_allocated)")
    p.add_argument("--profile", default=None, help="write torch.profiler tables of our pre-training step here")
    add_opts_argument(p)  # applied to every config the run reads (pre-training and detection)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- ours
def load_cfg(path, args):
    """The config at ``path`` with ``--arch`` applied, then the checked ``--opts``."""
    from itpn_d2.modeling import hivit_arch

    def set_arch(cfg):
        if args.arch:
            parts = args.arch.split(",")
            cfg.model.backbone.net.update(hivit_arch(parts[0], parts[1] if len(parts) > 1 else "official"))

    return load_config(path if os.path.isabs(path) else os.path.join(ROOT, path), args.opts, edit=set_arch)


def build_ours(args, device):
    from detectron2.config import instantiate

    cfg = load_cfg(args.config, args)
    cfg.model.backbone.net.pretrain_img_size = args.img
    if "pixel_decoder" in cfg.model and cfg.model.pixel_decoder is not None:
        cfg.model.pixel_decoder.pretrain_img_size = args.img
    cfg.model.mask_ratio = args.mask_ratio
    model = instantiate(cfg.model).to(device).train()
    return model, cfg


def build_ours_optimizer(cfg, model):
    """Our recipe's optimizer (``cfg.optimizer``: AdamW + param groups), as the training
    script builds it; ``--opts optimizer.fused=True`` selects the fused AdamW kernel."""
    from detectron2.config import instantiate

    ocfg = cfg.optimizer
    ocfg.params.model = model
    opt = instantiate(ocfg)
    del ocfg.params.model
    return opt


def param_groups(model, weight_decay=0.05):
    """Two groups (decay on >= 2-D weights only), identical for both sides."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model):
    return torch.optim.AdamW(param_groups(model), lr=1.5e-4, betas=(0.9, 0.95))


def synthetic_images(batch, img, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, img, img), generator=g, dtype=torch.uint8) for _ in range(batch)]


class TrainStep:
    """One optimizer step (``__call__``) or forward + backward only (``fwd_bwd``) of
    ``self.loss()``: the same code times both sides."""

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def fwd_bwd(self):
        self.loss().backward()

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.fwd_bwd()
        self.opt.step()


def loader_inputs(model, images, seed=0):
    """What the training loader hands the model: uint8 host images, each with the mask its
    DataLoader worker drew from the sample's seed (``ids_keep``, ``mask``), when this version
    of the code draws masks there; else the seed (the model draws the mask in the step)."""
    try:
        from itpn_d2.modeling.masking import mask_from_seed
    except ImportError:
        mask_from_seed = None
    out = []
    for i, im in enumerate(images):
        d = {"image": im, "mask_seed": seed + i}
        if mask_from_seed is not None:
            u = model.unit_size
            d["ids_keep"], d["mask"] = mask_from_seed(
                model.mask_generator, (im.shape[-2] // u, im.shape[-1] // u), model.mask_ratio, seed + i)
        out.append(d)
    return out


def model_flops(fn, *models) -> int:
    """FLOPs of ``fn`` with activation checkpointing off in ``models`` (HiViT's
    ``use_act_checkpoint``): the recomputed forward in backward is not model work."""
    saved = []
    for m in models:
        for mod in m.modules():
            if getattr(mod, "use_act_checkpoint", False):
                saved.append(mod)
                mod.use_act_checkpoint = False
    try:
        return count_flops(fn)
    finally:
        for mod in saved:
            mod.use_act_checkpoint = True


class OursStep(TrainStep):
    """One pre-training step of our MaskedPretrainer, from host inputs as the loader gives them."""

    def __init__(self, model, images, device, dtype, forward=None, optimizer=None):
        self.model, self.device, self.dtype = model, device, dtype
        self.inputs = loader_inputs(model, images)
        self.opt = optimizer if optimizer is not None else make_optimizer(model)
        self.forward = forward if forward is not None else model

    def loss(self):
        with autocast_ctx(self.device, self.dtype):
            losses = self.forward(self.inputs)
        return sum(losses.values())


# ------------------------------------------------------------------------ reference
class ReferenceUnavailable(RuntimeError):
    pass


def build_reference(device):
    """mmpretrain's iTPN pixel-B model from the config shipped inside the package."""
    try:
        import mmpretrain
        from mmengine.config import Config
        from mmpretrain.registry import MODELS
        from mmpretrain.utils import register_all_modules
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed"
        raise ReferenceUnavailable(f"mmpretrain not importable ({type(e).__name__}: {e})") from e
    pkg = os.path.dirname(mmpretrain.__file__)
    cands = [os.path.join(pkg, ".mim", "configs", "itpn", REFERENCE_CONFIG + ".py"),
             os.path.join(pkg, "configs", "itpn", REFERENCE_CONFIG + ".py")]
    path = next((c for c in cands if os.path.exists(c)), None)
    if path is None:
        raise ReferenceUnavailable(f"{REFERENCE_CONFIG}.py not found in the mmpretrain package ({cands})")
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(path)
    mcfg = cfg.model
    if "data_preprocessor" not in mcfg and cfg.get("data_preprocessor") is not None:
        mcfg["data_preprocessor"] = cfg.data_preprocessor
    model = MODELS.build(mcfg)
    import logging

    from mmengine.logging import MMLogger

    # init_weights logs one INFO record per tensor: keep the report readable
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    model.init_weights()
    model = model.to(device).train()
    return model, path, build_reference_optimizer(cfg, model)


def build_reference_optimizer(cfg, model):
    """The reference recipe's optimizer: its config's AdamW and ``paramwise_cfg`` through
    mmengine's constructor (a plain OptimWrapper: AmpOptimWrapper is CUDA-only and the fp16
    loss scaler has no role in fp32 or bf16)."""
    from mmengine.optim import build_optim_wrapper

    ow = dict(cfg.optim_wrapper)
    ow["type"] = "OptimWrapper"
    ow.pop("loss_scale", None)
    return build_optim_wrapper(model, ow).optimizer


class ReferenceStep(TrainStep):
    """One pre-training step of mmpretrain's iTPN: data_preprocessor + model.loss."""

    def __init__(self, model, images, device, dtype, optimizer=None):
        from mmpretrain.structures import DataSample

        self.model, self.device, self.dtype = model, device, dtype
        # default_collate's format (a stacked batch), as mmengine's runner feeds it
        self.data = {"inputs": torch.stack(images), "data_samples": [DataSample() for _ in images]}
        self.opt = optimizer if optimizer is not None else make_optimizer(model)

    def loss(self):
        with autocast_ctx(self.device, self.dtype):
            # mmengine's preprocessor copies the host batch to the device, as in its training
            data = self.model.data_preprocessor(self.data, True)
            losses = self.model.loss(data["inputs"], data["data_samples"])
            loss, _ = self.model.parse_losses(losses)
        return loss


# ------------------------------------------------------------------------- reports
def usable_dtypes(args, device, tag):
    out = []
    for d in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown {d!r}; choose from {sorted(DTYPES)}")
        if not native_low_precision(device, DTYPES[d]) and not args.force_bf16:
            print(f"[{tag}] {d}: SKIPPED: this CPU has no native {d} kernels (oneDNN: no AVX-512 bf16/AMX), "
                  f"{d} matmuls are emulated (< 1 GFLOP/s); --force-bf16 runs it anyway")
            continue
        out.append(d)
    return out


def machine_line(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    dev = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else (
        f"CPU {cpu}, {torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}")
    return f"machine: {dev}; torch {torch.__version__}; load avg {load}"


def fmt_mem(m):
    if m["bytes"] is None:
        return "n/a"
    return f"{m['bytes'] / 2**20:.0f} MiB ({m['how']})"


def bench_pretrain(args, device, warmup, reps):
    dtypes = usable_dtypes(args, device, "pretrain")
    torch.manual_seed(0)
    ours, ours_cfg = build_ours(args, device)
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f"[pretrain] ours: {args.config}{' arch=' + args.arch if args.arch else ''}: {n_ours / 1e6:.2f}M parameters, "
          f"batch {args.batch}, {args.img}px, mask ratio {args.mask_ratio}")
    forward = ours
    if args.compile:
        print(f"[pretrain] ours: torch.compile on {', '.join(compile_modules(ours))}")

    ref = ref_opt = None
    ours_opt = build_ours_optimizer(ours_cfg, ours) if args.optimizer == "recipe" else make_optimizer(ours)
    print(f"[pretrain] ours: optimizer {type(ours_opt).__name__} "
          f"({'recipe' if args.optimizer == 'recipe' else 'plain 2-group'}, "
          f"fused={ours_opt.defaults.get('fused')}, foreach={ours_opt.defaults.get('foreach')})")
    want_ref = args.reference == "on" or (
        args.reference == "auto" and args.arch is None and args.img == 224 and args.mask_ratio == 0.75
        and "mmpretrain" in args.config)
    if want_ref:
        try:
            ref, ref_path, ref_opt = build_reference(device)
            n_ref = sum(p.numel() for p in ref.parameters())
            print(f"[pretrain] reference: mmpretrain {REFERENCE_CONFIG} ({ref_path}): {n_ref / 1e6:.2f}M parameters")
        except ReferenceUnavailable as e:
            print(f"[pretrain] reference: UNAVAILABLE: {e}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            print(f"[pretrain] reference: UNAVAILABLE: building it failed ({type(e).__name__}: {e})")
    else:
        print("[pretrain] reference: not run (needs the mmpretrain-layout base config at 224 px, mask 0.75; "
              "--reference on forces it)")

    images = synthetic_images(args.batch, args.img)
    on_gpu = torch.device(device).type == "cuda"
    models = {"ours": ours, "reference": ref}
    results = {}
    for dname in dtypes:
        dtype = DTYPES[dname]
        if on_gpu:
            n = 8192  # 2048^3 is too little work to fill a large GPU
        else:
            n = 2048 if native_low_precision(device, dtype) else 512  # emulated bf16: 2048^3 takes minutes
        peak = matmul_rate(dtype, n=n, device=device, reps=3 if args.quick else 5, warmup=1)
        print(f"[pretrain] matmul {n}x{n} {dname}: {peak:.1f} GFLOP/s")
        card = None
        if on_gpu and dtype != torch.float32:
            card = args.peak_tflops or datasheet_tflops(torch.cuda.get_device_name(device), dtype)
            print(f"[pretrain] {dname} datasheet peak: " + (
                f"{card:.1f} TFLOP/s dense" if card else "unknown card (--peak-tflops gives it)"))
        steps = {"ours": OursStep(ours, images, device, dtype, forward, ours_opt)}
        if ref is not None:
            try:
                steps["reference"] = ReferenceStep(
                    ref, images, device, dtype, ref_opt if args.optimizer == "recipe" else None)
                steps["reference"]()  # fail here, not inside the timing loop
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                print(f"[pretrain] reference {dname}: UNAVAILABLE: its train step failed ({type(e).__name__}: {e})")
                steps.pop("reference")
        flops = {}
        for name, step in steps.items():
            flops[name] = model_flops(step.fwd_bwd, step.model)
        times = time_interleaved(steps, warmup=warmup, reps=reps, device=device)
        for name, step in steps.items():
            s = summarize(times[name])
            ips = args.batch / s["median"]
            rate = flops[name] / s["median"] / 1e9
            print(f"[pretrain] {name} {dname}: {ips:.2f} img/s; step {format_summary(s)}")
            print(f"[pretrain] {name} {dname}: {flops[name] / args.batch / 1e9:.2f} GFLOP/img fwd+bwd; "
                  f"{rate:.1f} GFLOP/s = {100 * rate / peak:.0f}% of the {dname} matmul rate")
            if card:
                print(f"[pretrain] {name} {dname}: MFU {100 * rate / (card * 1e3):.1f}% of the datasheet peak "
                      "(model FLOPs of the step from torch.utils.flop_counter / step time)")
            if not args.no_memory:
                others = [n for n in steps if n != name]
                other_bytes = 0
                if on_gpu and others:  # the other side's weights, gradients and optimizer state are not ours
                    other_bytes = live_tensor_bytes(*[models[n] for n in others], *[steps[n].opt for n in others])
                mem = peak_memory(step, device)
                if other_bytes and mem["bytes"] is not None:
                    mem = {"bytes": mem["bytes"] - other_bytes,
                           "how": f"{mem['how']} minus the other side's {other_bytes / 2**20:.0f} MiB of live tensors"}
                print(f"[pretrain] {name} {dname}: peak memory {fmt_mem(mem)}")
            results[(name, dname)] = s["median"]
        if "reference" in steps:
            r = results[("reference", dname)] / results[("ours", dname)]
            print(f"[pretrain] ratio ours/reference {dname} (throughput): {r:.2f}x")
        for step in steps.values():
            step.opt.zero_grad(set_to_none=True)
        del steps
    if args.profile:
        profile_pretrain(ours, forward, images, device, dtypes, args.profile, ours_opt)
    return results


def profile_pretrain(model, forward, images, device, dtypes, out_dir, optimizer=None):
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    for dname in dtypes:
        step = OursStep(model, images, device, DTYPES[dname], forward, optimizer)
        step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        path = os.path.join(out_dir, f"pretrain_{dname}.txt")
        with open(path, "w") as f:
            f.write(table)
        print(f"[profile] {dname}: {path}")


# ------------------------------------------------------------------- training loop
def bench_image_folder(n, size, seed=0):
    """``n`` generated PNGs (smooth colour fields, size x size) in a temporary folder,
    registered as the dataset "itpn_benchmark_unlabeled"; returns the name."""
    import tempfile

    import numpy as np
    from detectron2.data import DatasetCatalog
    from PIL import Image

    from itpn_d2.data.image_folder import register_image_folder

    root = tempfile.mkdtemp(prefix="itpn_bench_images_")
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(os.path.join(root, f"{i:05d}.png"))
    name = "itpn_benchmark_unlabeled"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    register_image_folder(name, root)
    return name, root


def bench_loop(args, device, warmup, reps):
    """Images/s of ``trainer.run_step()`` with the config's loader, trainer and optimizer."""
    import shutil

    from detectron2.config import instantiate
    from detectron2.utils.events import EventStorage

    from itpn_d2.engine.trainer import build_trainer

    dtypes = usable_dtypes(args, device, "loop")
    name, root = bench_image_folder(args.loop_images, max(256, args.img + args.img // 2))
    on_gpu = torch.device(device).type == "cuda"
    try:
        for dname in dtypes:
            cfg = load_cfg(args.config, args)
            cfg.model.backbone.net.pretrain_img_size = args.img
            for dec in ("pixel_decoder", "mfm_decoder"):
                if cfg.model.get(dec) is not None:
                    cfg.model[dec].pretrain_img_size = args.img
            cfg.model.mask_ratio = args.mask_ratio
            cfg.dataloader.train.dataset.names = name
            cfg.dataloader.train.mapper.image_size = args.img
            cfg.dataloader.train.total_batch_size = args.batch
            cfg.dataloader.train.num_workers = args.workers
            cfg.train.device = str(device)
            cfg.train.amp.enabled = dname != "fp32"
            if dname != "fp32":
                cfg.train.amp.dtype = {"bf16": "bfloat16", "fp16": "float16"}[dname]
            torch.manual_seed(0)
            model = instantiate(cfg.model).to(device)
            cfg.optimizer.params.model = model
            opt = instantiate(cfg.optimizer)
            loader = instantiate(cfg.dataloader.train)
            masks = "in the training step"
            try:
                from itpn_d2.data.resumable import attach_mask_generator

                if attach_mask_generator(loader, model.mask_generator, model.mask_ratio, model.unit_size):
                    masks = "in the DataLoader workers"
            except ImportError:
                pass
            trainer = build_trainer(cfg, model, loader, opt)
            print(f"[loop] {args.config}{' arch=' + args.arch if args.arch else ''}: batch {args.batch}, {args.img}px, "
                  f"{args.workers} workers, {type(trainer).__name__}, masks drawn {masks}")
            times = []
            with EventStorage(0) as storage:
                trainer.storage = storage
                for i in range(warmup + reps):
                    trainer.iter = storage.iter = i
                    sync(device)
                    t0 = time.perf_counter()
                    trainer.run_step()
                    sync(device)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
            s = summarize(times)
            print(f"[loop] {dname}: {args.batch / s['median']:.2f} img/s; step {format_summary(s)} "
                  f"(loader wait included{'; H2D copy included' if on_gpu else ''})")
            del trainer, loader, opt, model
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------- detection heads in fp32
# --det-bf16-heads fp32: on CPU, bf16 autocast turns the detection heads' convolutions (RPN,
# the 4-conv box and mask heads), their deconvolution and RoIAlign into bf16 kernels that, on
# CPUs without native bf16, are far slower than their fp32 versions. The heads are a small share
# of the FLOPs, so this variant runs them in fp32 and keeps the backbone under autocast.
# Training runs the heads under autocast; only the benchmark offers this variant.
# set_head_autocast(model, enabled=False) patches the *instance* ``forward`` of the head modules
# (module structure and state-dict keys do not change); enabled=True restores them.
HEAD_MODULES = ("proposal_generator", "roi_heads", "sem_seg_head")


def _to_fp32(obj):
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, dict):
        return {k: _to_fp32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_fp32(v) for v in obj)
    return obj


def _fp32_forward(module: nn.Module, orig):
    @functools.wraps(orig)
    def forward(*args, **kwargs):
        if not torch.is_autocast_enabled(_device_type(module)):
            return orig(*args, **kwargs)
        with torch.autocast(device_type=_device_type(module), enabled=False):
            return orig(*_to_fp32(args), **_to_fp32(kwargs))

    return forward


def _device_type(module: nn.Module) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


def set_head_autocast(model: nn.Module, enabled: bool, names: Iterable[str] = HEAD_MODULES) -> nn.Module:
    """Run ``model.<name>`` for each of ``names`` in fp32 (``enabled=False``) or under the
    caller's autocast (``enabled=True``, the default behaviour). Returns ``model``."""
    model = getattr(model, "module", model)  # DDP
    for name in names:
        m = getattr(model, name, None)
        if m is None:
            continue
        patched = "forward" in m.__dict__
        if enabled and patched:
            del m.forward
        elif not enabled and not patched:
            m.forward = _fp32_forward(m, type(m).forward.__get__(m))
    return model


# ------------------------------------------------------------------------ detection
def synthetic_det_inputs(batch, h, w, device, num_classes=80, seed=0):
    from detectron2.structures import Boxes, Instances, PolygonMasks

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).to(device)
        n = 5
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 32 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat([xy, xy + wh], 1)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        polys = [[[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]] for b in boxes.tolist()]
        inst.gt_masks = PolygonMasks(polys)
        out.append({"image": img, "height": h, "width": w, "instances": inst.to(device)})
    return out


def bench_det(args, device, warmup, reps):
    from detectron2.config import instantiate
    from detectron2.utils.events import EventStorage

    dtypes = usable_dtypes(args, device, "det")
    cfg = load_cfg(args.det_config, args)
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device)
    if args.compile:
        print(f"[det] torch.compile on {', '.join(compile_modules(model))}")
    on_gpu = torch.device(device).type == "cuda"
    batch = args.det_batch or (2 if on_gpu else 1)
    n = sum(p.numel() for p in model.parameters())
    print(f"[det] {args.det_config}{' arch=' + args.arch if args.arch else ''}: {n / 1e6:.2f}M parameters, "
          f"batch {batch}")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.det_sizes.split(",") if s]
    for h, w in sizes:
        inputs = synthetic_det_inputs(batch, h, w, device, num_classes=int(cfg.model.roi_heads.num_classes))
        for dname in dtypes:
            dtype = DTYPES[dname]
            heads = args.det_bf16_heads if dtype != torch.float32 else "fp32"
            set_head_autocast(model, enabled=(heads != "fp32"))
            opt = make_optimizer(model)

            def train_step():
                opt.zero_grad(set_to_none=True)
                with EventStorage(0), autocast_ctx(device, dtype):  # detectron2 heads log to a storage
                    losses = model(inputs)
                sum(losses.values()).backward()
                opt.step()

            def infer():
                with torch.no_grad(), autocast_ctx(device, dtype):
                    model(inputs)

            tag = f"{h}x{w} {dname}" + (f" (heads {heads})" if dtype != torch.float32 else "")
            model.train()
            if args.memory_only:
                train_step()  # creates the optimizer state, which is live during every later step
            else:
                s = summarize(time_reps(train_step, warmup=warmup, reps=reps, device=device))
                print(f"[det] train {tag}: {batch / s['median']:.2f} img/s; step {format_summary(s)}")
            if not args.no_memory:
                if on_gpu or not args.memory_only:  # the real max_memory_allocated on a GPU; CPU RSS costs a step
                    print(f"[det] train {tag}: peak memory {fmt_mem(peak_memory(train_step, device))}")
                opt.zero_grad(set_to_none=True)  # the step's own zero_grad must free nothing counted
                live = live_tensor_bytes(model, opt, inputs)
                print(f"[det] train {tag}: peak allocated {fmt_mem(peak_allocated(train_step, device, baseline=live))}")
            opt.zero_grad(set_to_none=True)
            del opt
            model.eval()
            if not args.memory_only:
                s = summarize(time_reps(infer, warmup=warmup, reps=reps, device=device))
                print(f"[det] inference {tag}: latency {format_summary(s)} for batch {batch}")
            if not args.no_memory:
                if on_gpu or not args.memory_only:  # the real max_memory_allocated on a GPU; CPU RSS costs a step
                    print(f"[det] inference {tag}: peak memory {fmt_mem(peak_memory(infer, device))}")
                live = live_tensor_bytes(model, inputs)
                print(f"[det] inference {tag}: peak allocated {fmt_mem(peak_allocated(infer, device, baseline=live))}")
    set_head_autocast(model, enabled=True)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import itpn_d2  # noqa: F401  (registries)

    print(machine_line(device))
    if args.batch is None:
        args.batch = 512 if device.type == "cuda" else 4
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = set(what) - {"pretrain", "loop", "det"}
    if unknown:
        raise SystemExit(f"--what: unknown {sorted(unknown)}; choose from pretrain, loop, det")
    pw, pr = (1, 3) if args.quick else (3, 10)
    dw, dr = (1, 1) if args.quick else (1, 3)
    if "pretrain" in what:
        bench_pretrain(args, device, args.warmup if args.warmup is not None else pw, args.reps or pr)
    if "loop" in what:
        bench_loop(args, device, args.warmup if args.warmup is not None else pw, args.reps or pr)
    if "det" in what:
        bench_det(args, device, args.warmup if args.warmup is not None else dw, args.reps or dr)


if __name__ == "__main__":
    main()
