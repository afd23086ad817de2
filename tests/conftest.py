import os
import sys

import torch

# Tiny test models run fastest single-threaded; with 2 threads on a shared 2-core machine,
# small matmuls slow down by orders of magnitude.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# tests/ and its area folders are importable (shared helpers such as tests/paths.py, and tests
# that reuse another area's helpers, e.g. test_cli.write_corpus), whichever file runs alone
_here = os.path.dirname(os.path.abspath(__file__))
for _d in sorted(os.listdir(_here)):
    if os.path.isdir(os.path.join(_here, _d)) and not _d.startswith((".", "_", "fixtures", "golden")):
        sys.path.insert(0, os.path.join(_here, _d))
sys.path.insert(0, _here)
