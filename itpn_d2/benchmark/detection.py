"""``--what det``: training-step time, inference latency and peak memory of a Mask R-CNN config
on synthetic images (:func:`synthetic_det_inputs`), with the detection heads under autocast
as in training or in fp32 (:func:`set_head_autocast`)."""
import functools
from typing import Iterable

import torch
from torch import nn

from itpn_d2.engine.compile import compile_modules
from itpn_d2.utils.memory import live_tensor_bytes, peak_allocated, peak_memory
from itpn_d2.utils.precision import autocast_ctx
from itpn_d2.utils.timing import format_summary, summarize, time_reps

from .options import DTYPES, load_cfg, usable_dtypes
from .report import fmt_mem
from .train_step import build_ours_optimizer, make_optimizer

__all__ = ["HEAD_MODULES", "set_head_autocast", "synthetic_det_inputs", "bench_det"]

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


def synthetic_det_inputs(batch, h, w, device, num_classes=80, seed=0):
    """``batch`` random h x w images, each with 5 random boxes, classes and box-shaped polygon masks."""
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
    """Print the detection figures of every size in ``args.det_sizes`` and every usable dtype."""
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
    opt_name = "the config's" if args.optimizer == "recipe" else "plain 2-group AdamW"
    print(f"[det] {args.det_config}{' arch=' + args.arch if args.arch else ''}: {n / 1e6:.2f}M parameters, "
          f"batch {batch}, optimizer {opt_name}")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.det_sizes.split(",") if s]
    for h, w in sizes:
        inputs = synthetic_det_inputs(batch, h, w, device, num_classes=int(cfg.model.roi_heads.num_classes))
        for dname in dtypes:
            dtype = DTYPES[dname]
            heads = args.det_bf16_heads if dtype != torch.float32 else "fp32"
            set_head_autocast(model, enabled=(heads != "fp32"))
            # the config's optimizer (layer-decay groups, fused AdamW), as training builds it: its
            # state and temporaries are part of a step's time and peak memory
            opt = build_ours_optimizer(cfg, model) if args.optimizer == "recipe" else make_optimizer(model)

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
