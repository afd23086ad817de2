"""What a benchmark ran on."""
from __future__ import annotations

import os
import platform
from typing import Optional


def source_commit() -> Optional[str]:
    """The git commit of the checkout this package is imported from, ``+dirty`` appended when
    tracked files differ from it; None outside a git checkout (an installed wheel) or without
    git. Ties a benchmark's results to the code that produced them."""
    import subprocess
    from pathlib import Path
    here = Path(__file__).resolve()
    root = here.parents[3]
    if here.parents[1] != root / "src" / "tdlm":     # not this repository's layout
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info(threads: Optional[int] = None) -> dict:
    """What a benchmark ran on: platform, python, torch, CPU model, core count, total memory,
    torch threads, GPU name when CUDA is available, the source commit (``source_commit``) and
    the load average at the call (the machines these benchmarks run on are often shared)."""
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
    d["commit"] = source_commit()
    try:
        d["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return d


class PeakMemory:
    """Peak memory of the code inside ``with PeakMemory(device) as m:`` -> ``m.peak_bytes``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensor memory of the device).
    CPU with glibc: the bytes malloc has handed out and not taken back (``mallinfo2``: heap
    chunks in use + mmapped chunks), sampled every ``interval`` s by a thread, reported as the
    increase over its value at entry: the CPU analogue of CUDA's allocated bytes, blind to
    freed memory the allocator keeps (``train.cpu_allocator=retain`` keeps it all, so a
    resident-set measure would miss a block's reuse of it). Elsewhere: the resident set size,
    sampled the same way. ``kind`` says which."""

    def __init__(self, device=None, interval: float = 0.02):
        import torch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval, self.peak_bytes, self.kind = interval, 0, None
        self._stop = None

    _mallinfo2 = None

    @classmethod
    def heap_bytes(cls) -> Optional[int]:
        """Bytes in use by glibc's malloc (``mallinfo2``: uordblks + hblkhd), or None where
        there is no glibc >= 2.33."""
        if cls._mallinfo2 is None:
            cls._mallinfo2 = False
            try:
                import ctypes
                import platform
                if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
                    fn = ctypes.CDLL("libc.so.6").mallinfo2

                    class _Info(ctypes.Structure):
                        _fields_ = [(n, ctypes.c_size_t) for n in (
                            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                            "fsmblks", "uordblks", "fordblks", "keepcost")]
                    fn.restype = _Info
                    cls._mallinfo2 = fn
            except (OSError, AttributeError):
                pass
        if not cls._mallinfo2:
            return None
        info = cls._mallinfo2()
        return int(info.uordblks + info.hblkhd)

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
        if self.heap_bytes() is not None:
            self.kind = "CPU heap bytes in use increase (glibc mallinfo2, sampled)"
            self._probe = self.heap_bytes
        else:
            self.kind = "CPU resident set size increase (sampled)"
            self._probe = self.rss_bytes
        self._base = self._peak = self._probe()
        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self._probe())
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
        self._peak = max(self._peak, self._probe())
        self.peak_bytes = self._peak - self._base
