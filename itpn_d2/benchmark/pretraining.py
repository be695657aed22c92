"""``--what pretrain``: throughput, FLOP rate, MFU and peak memory of our pre-training step,
rep by rep interleaved with mmpretrain's (:mod:`.reference`) when it runs; and the profiler
tables of our step (``--profile``)."""
import os
import traceback

import torch

from itpn_d2.engine.compile import compile_modules
from itpn_d2.utils.flops import datasheet_tflops, matmul_rate
from itpn_d2.utils.memory import live_tensor_bytes, peak_memory
from itpn_d2.utils.precision import native_low_precision
from itpn_d2.utils.timing import format_summary, summarize, time_interleaved

from .options import DTYPES, usable_dtypes
from .reference import REFERENCE_CONFIG, ReferenceStep, ReferenceUnavailable, build_reference
from .report import fmt_mem
from .train_step import OursStep, build_ours, build_ours_optimizer, make_optimizer, model_flops, synthetic_images

__all__ = ["bench_pretrain", "profile_pretrain"]


def bench_pretrain(args, device, warmup, reps):
    """Print the pre-training figures of every usable dtype; returns {(side, dtype): median step seconds}."""
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
    opts = {"ours": ours_opt, "reference": ref_opt}
    results = {}
    for dname in dtypes:
        dtype = DTYPES[dname]
        if on_gpu:
            n = 8192  # 2048^3 is too little work to fill a large GPU
        else:
            n = 2048 if native_low_precision(device, dtype) else 512  # emulated bf16: 2048^3 takes minutes
        # a bf16 8192^3 matmul is ~1-2 ms on an H100-class card: more of them than on the CPU (a guess
        # that the clocks settle, not measured: no GPU has run this yet), still < 1 s in fp32
        mm_reps, mm_warmup = (20, 10) if on_gpu else (3 if args.quick else 5, 1)
        peak = matmul_rate(dtype, n=n, device=device, reps=mm_reps, warmup=mm_warmup)
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
                opts["reference"] = steps["reference"].opt
                steps["reference"]()  # fail here, not inside the timing loop
            except Exception as e:  # noqa: BLE001
                _drop_reference(steps, dname, "its train step failed", e)
        flops = {"ours": model_flops(steps["ours"].fwd_bwd, steps["ours"].model)}
        if "reference" in steps:  # the reference has never run on every machine: its failure drops it alone
            try:
                flops["reference"] = model_flops(steps["reference"].fwd_bwd, steps["reference"].model)
            except Exception as e:  # noqa: BLE001
                _drop_reference(steps, dname, "its FLOP count failed", e)
        try:
            times = time_interleaved({k: _ReferenceFailed.tag(v) if k == "reference" else v for k, v in steps.items()},
                                     warmup=warmup, reps=reps, device=device)
        except _ReferenceFailed as e:  # ours' own failures propagate: they are ours
            _drop_reference(steps, dname, "its timed steps failed", e.__cause__)
            times = time_interleaved(steps, warmup=warmup, reps=reps, device=device)
        for name, step in steps.items():
            s = summarize(times[name])
            results[(name, dname)] = s["median"]
            ips = args.batch / s["median"]
            rate = flops[name] / s["median"] / 1e9
            print(f"[pretrain] {name} {dname}: {ips:.2f} img/s; step {format_summary(s)}")
            print(f"[pretrain] {name} {dname}: {flops[name] / args.batch / 1e9:.2f} GFLOP/img fwd+bwd; "
                  f"{rate:.1f} GFLOP/s = {100 * rate / peak:.0f}% of the {dname} matmul rate")
            if card:
                print(f"[pretrain] {name} {dname}: MFU {100 * rate / (card * 1e3):.1f}% of the datasheet peak "
                      "(model FLOPs of the step from torch.utils.flop_counter / step time)")
            if not args.no_memory:
                # the other side's weights, gradients and optimizer state are not ours (a dropped
                # reference keeps its weights on the device: another dtype may still run it)
                others = [n for n in models if n != name and models[n] is not None]
                other_bytes = 0
                if on_gpu and others:
                    other_bytes = live_tensor_bytes(*[models[n] for n in others],
                                                    *[opts[n] for n in others if opts[n] is not None])
                try:
                    mem = peak_memory(step, device)
                except Exception as e:  # noqa: BLE001 - the reference's memory only: ours must not fail
                    if name == "ours":
                        raise
                    print(f"[pretrain] {name} {dname}: peak memory not measured ({type(e).__name__}: {e})")
                    continue
                if other_bytes and mem["bytes"] is not None:
                    mem = {"bytes": mem["bytes"] - other_bytes,
                           "how": f"{mem['how']} minus the other side's {other_bytes / 2**20:.0f} MiB of live tensors"}
                print(f"[pretrain] {name} {dname}: peak memory {fmt_mem(mem)}")
        if "reference" in steps:
            r = results[("reference", dname)] / results[("ours", dname)]
            print(f"[pretrain] ratio ours/reference {dname} (throughput): {r:.2f}x")
        for step in steps.values():
            step.opt.zero_grad(set_to_none=True)
        del steps
    if args.profile:
        profile_pretrain(ours, forward, images, device, dtypes, args.profile, ours_opt)
    return results


class _ReferenceFailed(RuntimeError):
    """Raised from the reference's step (the original error is its ``__cause__``), so a failure in
    the timed loop is pinned on the side that raised it."""

    @classmethod
    def tag(cls, step):
        def call():
            try:
                step()
            except Exception as e:  # noqa: BLE001
                raise cls(str(e)) from e
        return call


def _drop_reference(steps, dname, what, error):
    """Print why the reference side is dropped (the line ``tools/gpu_check.py`` parses), drop it and
    free its gradients and optimizer state, which would otherwise count in our peak memory."""
    traceback.print_exception(error)
    print(f"[pretrain] reference {dname}: UNAVAILABLE: {what} ({type(error).__name__}: {error})")
    step = steps.pop("reference", None)
    if step is not None:
        step.opt.zero_grad(set_to_none=True)
        step.opt.state.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_pretrain(model, forward, images, device, dtypes, out_dir, optimizer=None):
    """Write ``pretrain_<dtype>.txt``: torch.profiler's table of one step of ours, per dtype."""
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
