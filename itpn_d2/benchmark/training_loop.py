"""``--what loop``: images/s of ``trainer.run_step()`` exactly as the training script runs it
(the config's loader over generated images, ``build_trainer``, the config's optimizer)."""
import os
import time
from typing import List

import torch

from itpn_d2.utils.timing import format_summary, summarize, sync

from .options import load_cfg, usable_dtypes

__all__ = ["bench_image_folder", "bench_loop", "trainer_step_times"]


def trainer_step_times(trainer, warmup: int, reps: int, device) -> List[float]:
    """Seconds of each of ``reps`` ``trainer.run_step()`` calls after ``warmup`` untimed ones,
    inside an EventStorage as the training loop runs them (loader wait included)."""
    from detectron2.utils.events import EventStorage

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
    return times


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
            s = summarize(trainer_step_times(trainer, warmup, reps, device))
            print(f"[loop] {dname}: {args.batch / s['median']:.2f} img/s; step {format_summary(s)} "
                  f"(loader wait included{'; H2D copy included' if on_gpu else ''})")
            del trainer, loader, opt, model
    finally:
        shutil.rmtree(root, ignore_errors=True)
