"""Lines of the benchmark's report shared by every part: the machine, a memory figure."""
import os
import platform

import torch

__all__ = ["machine_line", "fmt_mem"]


def machine_line(device):
    """One line naming the machine (GPU, or CPU model, threads and ISA), torch and the load."""
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
    """A :func:`itpn_d2.utils.memory.peak_memory` / ``peak_allocated`` result as "N MiB (how)"."""
    if m["bytes"] is None:
        return "n/a"
    return f"{m['bytes'] / 2**20:.0f} MiB ({m['how']})"
