"""``--what finetune``: images/s of the fine-tuning training step exactly as the training script
runs it: the config's own loader on its own (built-in) dataset, ``build_trainer``, the config's
optimizer. The demo's Mask R-CNN, its UPerNet head on a frozen backbone and UPerNet fine-tuned
whole by default, so a change to the demo's
fine-tuning speed shows as a before/after ratio of these figures; ``--profile DIR`` adds
torch.profiler's table of a few steps per config (where the time goes)."""
import os
from typing import List

import torch

from itpn_d2.utils.timing import format_summary, summarize

from .options import BenchmarkOptions, load_cfg
from .training_loop import trainer_step_times

__all__ = ["DEMO_FINETUNE_CONFIGS", "bench_finetune"]

DEMO_FINETUNE_CONFIGS = BenchmarkOptions.finetune_configs


def _datasets_of(cfg) -> List[str]:
    names = cfg.dataloader.train.dataset.names
    return [names] if isinstance(names, str) else list(names)


def _profile(trainer, steps: int, out_path: str) -> None:
    from detectron2.utils.events import EventStorage
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with EventStorage(0) as storage, profile(activities=acts) as prof:
        trainer.storage = storage
        for i in range(steps):
            trainer.iter = storage.iter = 1000 + i
            trainer.run_step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    with open(out_path, "w") as f:
        f.write(f"{steps} training steps, torch.profiler, sorted by self CPU time\n{table}\n")
    print(f"[finetune] profile: {out_path}")


def bench_finetune(args, device, warmup: int, reps: int) -> None:
    """Time ``trainer.run_step()`` of every config in ``args.finetune_configs`` (comma list)."""
    from detectron2.config import instantiate
    from detectron2.data import MetadataCatalog

    from itpn_d2.data.builtin import ensure_registered_synthetic
    from itpn_d2.engine.trainer import build_trainer

    for path in [p.strip() for p in args.finetune_configs.split(",") if p.strip()]:
        cfg = load_cfg(path, args)
        for name in _datasets_of(cfg):
            if hasattr(MetadataCatalog.get(name), "synthetic_spec"):
                ensure_registered_synthetic(name)  # generated once, reused from its cache after
        cfg.train.device = str(device)
        torch.manual_seed(0)
        model = instantiate(cfg.model).to(device)
        model.train()
        cfg.optimizer.params.model = model
        opt = instantiate(cfg.optimizer)
        loader = instantiate(cfg.dataloader.train)
        trainer = build_trainer(cfg, model, loader, opt)
        batch = int(cfg.dataloader.train.total_batch_size)
        print(f"[finetune] {path}: batch {batch}, {cfg.dataloader.train.num_workers} workers, "
              f"{torch.get_num_threads()} threads, {type(trainer).__name__}")
        s = summarize(trainer_step_times(trainer, warmup, reps, device))
        print(f"[finetune] {os.path.basename(path)}: {batch / s['median']:.2f} img/s; step {format_summary(s)} "
              f"(loader wait included)")
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            stem = os.path.splitext(os.path.basename(path))[0]
            _profile(trainer, max(3, reps // 2), os.path.join(args.profile, f"finetune_{stem}.txt"))
        del trainer, loader, opt, model
