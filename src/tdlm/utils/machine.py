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


class PeakMemory:
    """Peak memory of the code inside ``with PeakMemory(device) as m:`` -> ``m.peak_bytes``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensor memory of the device).
    CPU: the process's resident set size sampled every ``interval`` s by a thread, reported as
    the increase over its value at entry (what the block added to the process; allocations
    released before the block are reused and not counted twice). ``kind`` says which."""

    def __init__(self, device=None, interval: float = 0.02):
        import torch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval, self.peak_bytes, self.kind = interval, 0, None
        self._stop = None

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> "PeakMemory":
        import threading

        import torch
        if self.device.type == "cuda":
            self.kind = "cuda max_memory_allocated"
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self.kind = "CPU resident set size increase (sampled)"
        self._base = self._peak = self.rss_bytes()
        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self.rss_bytes())
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.rss_bytes())
        self.peak_bytes = self._peak - self._base
