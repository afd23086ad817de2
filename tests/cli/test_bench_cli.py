"""`tdlm bench ...`: wiring to the repository's benchmarks/ scripts (fast: params only)."""
import json

import pytest

from tdlm.cli import bench as bench_cli
from tdlm.cli import main


def test_bench_lists_the_benchmarks(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("params", "memory", "speed", "quality"):
        assert name in out


@pytest.mark.parametrize("name", ["speed", "quality", "memory"])
def test_bench_passes_arguments_through(name, capfd):
    """Options after the subcommand reach the script (its own argparse --help)."""
    if bench_cli.benchmarks_dir() is None:
        pytest.skip("no benchmarks/ folder (not a source checkout)")
    assert main(["bench", name, "--help"]) == 0
    out = capfd.readouterr().out
    assert f"{name}.py" in out and "--out" in out


@pytest.mark.slow
def test_bench_params_writes_json(tmp_path, capsys):
    """Runs benchmarks/params.py end to end (~5-20 s: builds the presets on the meta device)."""
    if bench_cli.benchmarks_dir() is None:
        pytest.skip("no benchmarks/ folder (not a source checkout)")
    assert main(["bench", "params", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "params.json").read_text())
    assert {"mdlm", "tdlm", "total_ratio"} <= set(rows[0])
    assert (tmp_path / "params.md").exists()


def test_bench_params_help_does_not_run(tmp_path, capfd, monkeypatch):
    """--help reaches params.py's own option parser: it shows the docstring, writes nothing."""
    if bench_cli.benchmarks_dir() is None:
        pytest.skip("no benchmarks/ folder (not a source checkout)")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "params", "--help"]) == 0
    assert "Parameter budget" in capfd.readouterr().out
    assert not any(tmp_path.iterdir())


def test_bench_without_benchmarks_folder(monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "benchmarks_dir", lambda: None)
    assert main(["bench", "speed", "--batch", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "benchmarks/speed.py" in err and "\n" not in err
