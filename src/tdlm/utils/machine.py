"""What a benchmark ran on."""
from __future__ import annotations

import os
import platform
from typing import Optional


def machine_info(threads: Optional[int] = None) -> dict:
    """What a benchmark ran on: platform, python, torch, CPU model, core count, total memory,
    torch threads, GPU name when CUDA is available, and the load average at the call (the
    machines these benchmarks run on are often shared)."""
    import torch
    d = {"platform": platform.platform(), "python": platform.python_version(),
         "torch": torch.__version__, "cpu_count": os.cpu_count(),
         "threads": threads if threads is not None else torch.get_num_threads(),
         "cuda": torch.cuda.is_available()}
    for path, key, field in (("/proc/cpuinfo", "model name", "cpu"),
                             ("/proc/meminfo", "MemTotal", "mem_total")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        d[field] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    if d["cuda"]:
        d["gpu"] = torch.cuda.get_device_name(0)
    try:
        d["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return d
