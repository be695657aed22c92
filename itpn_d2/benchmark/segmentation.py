"""A UPerNet training step timed and measured (the segmentation stage of ``tools/gpu_check.py``,
run in its own process as ``tools/gpu_check.py --seg-worker``)."""
import json
import os

from itpn_d2.engine.trainer import NonFiniteLossError
from itpn_d2.utils.checkout import REPO_ROOT

__all__ = ["SEG_CONFIG", "RESULT_MARK", "seg_worker"]

SEG_CONFIG = "configs/ADE20K/uper_itpn_base_160k.py"
# prefix of the one output line that carries the figures, as JSON
RESULT_MARK = "GPU_CHECK_RESULT "


def seg_worker(*, device, size: int, batch: int, dtype: str, arch=None, warmup: int = 1, reps: int = 3,
               opts=()) -> dict:
    """One UPerNet training step timed (``time_reps``) and measured (``peak_memory``) as the
    detection benchmark does; prints the figures as one JSON line (after :data:`RESULT_MARK`) and
    returns them. ``arch``: a HiViT size replacing the config's; ``opts``: checked overrides.
    Raises :class:`NonFiniteLossError` when the last step's loss is not finite."""
    import torch
    from detectron2.config import instantiate
    from detectron2.utils.events import EventStorage

    from itpn_d2.config import load_config
    from itpn_d2.modeling import hivit_arch
    from itpn_d2.utils.memory import peak_memory
    from itpn_d2.utils.precision import autocast_ctx
    from itpn_d2.utils.timing import format_summary, summarize, time_reps

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    device = torch.device(device)

    def set_arch(cfg):
        if arch:
            cfg.model.backbone.net.update(hivit_arch(arch, "official"))

    cfg = load_config(os.path.join(REPO_ROOT, SEG_CONFIG), list(opts), edit=set_arch)
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)  # the recipe's AdamW with layer-wise lr decay groups
    num_classes = int(cfg.model.sem_seg_head.num_classes)
    g = torch.Generator().manual_seed(0)
    s = size
    inputs = [{"image": torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8).to(device),
               "sem_seg": torch.randint(0, num_classes, (s, s), generator=g).to(device)}
              for _ in range(batch)]
    dtype_name, dtype = dtype, dtypes[dtype]

    def train_step():
        opt.zero_grad(set_to_none=True)
        with EventStorage(0), autocast_ctx(device, dtype):
            losses = model(inputs)
        loss = sum(losses.values())
        loss.backward()
        opt.step()
        return loss

    t = summarize(time_reps(train_step, warmup=warmup, reps=reps, device=device))
    print(f"[seg] train {s}x{s} {dtype_name}: step {format_summary(t)}", flush=True)
    mem = peak_memory(train_step, device)
    loss = float(train_step().detach().float())
    fig = {"config": SEG_CONFIG, "arch": arch or "base (config)", "dtype": dtype_name,
           "batch": batch, "size": f"{s}x{s}", "parameters_m": round(
               sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "train_s_per_iter": t["median"], "train_img_per_s": batch / t["median"],
           "train_peak_memory_mib": None if mem["bytes"] is None else round(mem["bytes"] / 2**20),
           "train_peak_memory_how": mem["how"], "last_loss": loss}
    if not torch.isfinite(torch.tensor(loss)):
        raise NonFiniteLossError(f"[seg] the training loss is not finite: {loss}")
    print(RESULT_MARK + json.dumps(fig), flush=True)
    return fig
