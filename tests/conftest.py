import os
import sys

import torch

# Tiny test models run fastest single-threaded; with 2 threads on a shared 2-core machine,
# small matmuls slow down by orders of magnitude.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
