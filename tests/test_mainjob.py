"""The main job's own measurements: peak training memory and the parity verdict line."""
from __future__ import annotations

import json

import torch

from tdlm.mainjob import parity_verdict
from tdlm.utils.machine import PeakMemory


def test_peak_memory_sees_an_allocation_released_inside_the_block():
    with PeakMemory("cpu", interval=0.005) as m:
        x = torch.ones(64 * 2**20 // 4)          # 64 MiB, touched
        x += 1
        import time
        time.sleep(0.05)
        del x
    assert 48 * 2**20 < m.peak_bytes < 256 * 2**20, m.peak_bytes
    with PeakMemory("cpu") as small:
        pass
    assert small.peak_bytes < 16 * 2**20


def test_peak_memory_counts_reused_heap_after_the_trainer_retains_it():
    """After ``train.cpu_allocator=retain`` (what every CPU training run sets), a block that
    reuses freed heap adds no resident memory, yet it is counted (allocated bytes, not RSS)."""
    import time

    from tdlm.config import RunConfig
    from tdlm.train.step import resolve_runtime, retain_heap
    retain_heap(resolve_runtime(RunConfig().train, torch.device("cpu")))
    x = torch.ones(64 * 2**20 // 4)
    del x                                          # 64 MiB now free but kept in the heap
    with PeakMemory("cpu", interval=0.005) as m:
        y = torch.ones(64 * 2**20 // 4)
        time.sleep(0.05)
        del y
    if "mallinfo2" in m.kind:
        assert 60 * 2**20 < m.peak_bytes < 80 * 2**20, m.peak_bytes


def test_parity_verdict_reads_the_committed_study(tmp_path):
    p = tmp_path / "parity.json"
    assert "no committed verdict" in parity_verdict(p)
    p.write_text(json.dumps({"summary": {"seeds": [0, 1, 2], "verdict": "parity reproduced: x"}}))
    v = parity_verdict(p)
    assert "3 seed(s)" in v and "parity reproduced: x" in v


def test_parity_verdict_names_the_presets_and_file(tmp_path):
    p = tmp_path / "parity_gpt2.json"
    p.write_text(json.dumps({"presets": {"mdlm": "tiny-gpt2", "tdlm": "tdlm-tiny"},
                             "summary": {"seeds": [0, 1], "verdict": "undecided: y"}}))
    v = parity_verdict(p)
    assert "tiny-gpt2 vs tdlm-tiny" in v and "parity_gpt2.md" in v and "undecided: y" in v
