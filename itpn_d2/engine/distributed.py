"""Data-parallel training on detectron2's launcher, on GPUs (NCCL) and on CPUs (gloo).

detectron2's ``launch`` spawns ``--num-gpus`` processes per machine and picks NCCL when
CUDA is available, gloo otherwise; its ``create_ddp_model`` always passes
``device_ids=[local_rank]``, which ``DistributedDataParallel`` rejects for a CPU model.
Here:

* :func:`create_ddp_model` passes ``device_ids`` only for a CUDA model, turns
  ``gradient_as_bucket_view`` on (gradients live in DDP's all-reduce buckets: one copy of
  the gradients less in memory and per step), and with ``fp16_compression=True`` under bf16
  AMP registers the bf16 compression hook (fp16's would squeeze bf16 gradients into fp16's
  range);
* :func:`check_shared_output_dir` refuses a multi-node run whose ``train.output_dir`` is
  node-local (ranks would disagree on ``has_checkpoint()`` and resume at different iterations);
* :func:`launch` is detectron2's, except that ``device="cpu"`` on a machine that has
  GPUs still gives CPU processes with gloo (detectron2's would choose NCCL and bind each
  process to a GPU). ``--num-gpus`` then means "processes per machine", as detectron2's
  own docstring of ``launch`` says.
"""
import inspect
import logging
import os
import socket
import uuid
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["create_ddp_model", "launch", "end_process_group", "share_cpu_threads", "check_shared_output_dir",
           "OutputDirNotSharedError", "compression_hook"]

logger = logging.getLogger(__name__)


def compression_hook(fp16_compression: bool, amp_dtype: Optional[torch.dtype] = None):
    """The DDP communication hook for ``train.ddp.fp16_compression``: None when off; with bf16
    AMP ``bf16_compress_hook`` (the gradients keep bf16's exponent range), else fp16's."""
    if not fp16_compression:
        return None
    from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

    if amp_dtype == torch.bfloat16:
        return comm_hooks.bf16_compress_hook
    return comm_hooks.fp16_compress_hook


def create_ddp_model(model, *, fp16_compression: bool = False, amp_dtype: Optional[torch.dtype] = None, **kwargs):
    """detectron2's ``create_ddp_model`` for CUDA and CPU models: a ``DistributedDataParallel``
    when there is more than one process, ``model`` itself otherwise.

    Args:
        fp16_compression: compress gradients for the all-reduce (``train.ddp.fp16_compression``):
            to bf16 when ``amp_dtype`` is bf16, else to fp16.
        amp_dtype: the run's autocast dtype (None: fp32).
        kwargs: ``DistributedDataParallel``'s; ``gradient_as_bucket_view`` defaults to True.
    """
    if comm.get_world_size() == 1:
        return model
    kwargs.setdefault("gradient_as_bucket_view", True)
    if "broadcast_buffers" in kwargs and "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        # torch >= 2.14 deprecates broadcast_buffers; forward_sync_buffers is the same switch for the
        # forward pass (buffers are synced at construction either way, as detectron2 always had them).
        kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    hook = compression_hook(fp16_compression, amp_dtype)
    if hook is not None:
        ddp.register_comm_hook(state=None, hook=hook)
    return ddp


class OutputDirNotSharedError(RuntimeError):
    """The processes of a run do not all see the same ``train.output_dir``."""


def check_shared_output_dir(output_dir: str) -> None:
    """Refuse a multi-process run whose processes do not share ``output_dir`` (a collective:
    every rank calls it, after the process group exists).

    Rank 0 writes a token file with a random name into the directory; after a barrier every
    rank looks for it. A node-local path (e.g. ``./output`` or ``/tmp/...`` on every machine
    of a multi-node run) makes ranks see different checkpoints: on ``--resume`` they disagree
    on ``has_checkpoint()`` and start at different iterations (a hang, or desynchronised
    schedules). Raises :class:`OutputDirNotSharedError` on every rank, naming the ranks and
    hosts that cannot see it. A single process: nothing to check.
    """
    if comm.get_world_size() == 1:
        return
    token = None
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        token = f".itpn_shared_dir_check_{uuid.uuid4().hex}"
        with open(os.path.join(output_dir, token), "w") as f:
            f.write(socket.gethostname())
    token = comm.all_gather(token)[0]  # a CPU collective (gloo group): also a barrier
    path = os.path.join(output_dir, token)
    seen = comm.all_gather((comm.get_rank(), socket.gethostname(), os.path.isfile(path)))
    comm.synchronize()
    if comm.is_main_process():
        try:
            os.remove(path)
        except OSError:
            pass
    missing = [(r, h) for r, h, ok in seen if not ok]
    if missing:
        who = ", ".join(f"rank {r} on {h}" for r, h in missing)
        raise OutputDirNotSharedError(
            f"train.output_dir={output_dir!r} is not shared by all processes: {who} cannot see the file "
            f"rank 0 (on {seen[0][1]}) wrote there. Every process reads and writes checkpoints in it, so a "
            "multi-node run needs a directory on a file system that all machines mount (NFS, Lustre, ...) "
            "at the same path; set train.output_dir to one."
        )


def share_cpu_threads(device: str) -> int:
    """Split this machine's cores between the CPU processes that run on it.

    torch gives every process as many intra-op threads as the machine has cores, so N CPU
    processes on C cores run N*C threads that evict each other; each process gets C // N
    (at least 1) instead. ``OMP_NUM_THREADS`` set by the user wins. Returns the threads used.
    """
    local = comm.get_local_size()
    if torch.device(device).type != "cpu" or local <= 1 or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    logger.info(f"{local} CPU processes on {cores} cores: {threads} torch thread(s) each")
    return threads


def end_process_group() -> None:
    """Tear down this process's default process group, if there is one, after a barrier.

    Called when a run has finished on every process. detectron2's launcher leaves the group to
    the interpreter's exit, and there gloo's background threads are sometimes still joinable when
    their C++ destructors run: the process then aborts ("terminate called without an active
    exception") after its work is done, and the launcher reports a failed run (seen once in a
    full test-suite run of the two-process CPU test, not in 11 runs of it alone). The barrier
    keeps rank 0, whose store the others may still use, from leaving first.
    """
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    global_rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
    )
    comm.create_local_process_group(procs_per_machine)
    comm.synchronize()
    main_func(*args)


def launch(
    main_func,
    num_procs_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url=None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "cuda",
):
    """``detectron2.engine.launch`` plus ``device``: with a device other than CUDA the
    processes use gloo and no GPU, even where GPUs exist (module docstring)."""
    world_size = num_machines * num_procs_per_machine
    cpu_only = torch.device(device).type != "cuda"
    if world_size <= 1 or not cpu_only or not torch.cuda.is_available():
        # detectron2's launcher already does the right thing (gloo when CUDA is absent)
        return d2_launch(
            main_func,
            num_procs_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.info(f"device={device}: {num_procs_per_machine} CPU processes per machine with gloo (GPUs left unused)")
    mp.start_processes(
        _cpu_worker,
        nprocs=num_procs_per_machine,
        args=(main_func, world_size, num_procs_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )
