"""Data-parallel training on detectron2's launcher, on GPUs (NCCL) and on CPUs (gloo).

detectron2's ``launch`` spawns ``--num-gpus`` processes per machine and picks NCCL when
CUDA is available, gloo otherwise; its ``create_ddp_model`` always passes
``device_ids=[local_rank]``, which ``DistributedDataParallel`` rejects for a CPU model.
Here:

* :func:`create_ddp_model` passes ``device_ids`` only for a CUDA model;
* :func:`launch` is detectron2's, except that ``device="cpu"`` on a machine that has
  GPUs still gives CPU processes with gloo (detectron2's would choose NCCL and bind each
  process to a GPU). ``--num-gpus`` then means "processes per machine", as detectron2's
  own docstring of ``launch`` says.
"""
import inspect
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["create_ddp_model", "launch", "share_cpu_threads"]

logger = logging.getLogger(__name__)


def create_ddp_model(model, *, fp16_compression: bool = False, **kwargs):
    """detectron2's ``create_ddp_model`` for CUDA and CPU models: a ``DistributedDataParallel``
    when there is more than one process, ``model`` itself otherwise."""
    if comm.get_world_size() == 1:
        return model
    if "broadcast_buffers" in kwargs and "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        # torch >= 2.14 deprecates broadcast_buffers; forward_sync_buffers is the same switch for the
        # forward pass (buffers are synced at construction either way, as detectron2 always had them).
        kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


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
