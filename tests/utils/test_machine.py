"""utils/machine.py: what a benchmark records about where it ran."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tdlm.utils import machine
from tdlm.utils.machine import machine_info, source_commit


def test_source_commit_is_this_checkouts_head():
    if shutil.which("git") is None:
        pytest.skip("no git")
    root = machine.__file__.rsplit("/src/tdlm/", 1)[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    got = source_commit()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", got)
    assert got.split("+")[0] == head.stdout.strip()
    assert machine_info()["commit"] == got


def test_source_commit_is_none_outside_the_repository_layout(tmp_path, monkeypatch):
    """A copy of the module outside src/tdlm (an installed wheel): no commit, not the commit of
    whatever git repository happens to hold it."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=False)
    fake = tmp_path / "site-packages" / "tdlm" / "utils" / "machine.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(machine, "__file__", str(fake))
    assert source_commit() is None
