from __future__ import annotations

import json
import subprocess
import sys

from fusedformer.bench.report import validate


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fusedformer.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help():
    out = cli("--help")
    assert out.returncode == 0
    for word in ("info", "bench"):
        assert word in out.stdout
    out = cli("bench", "--help")
    assert out.returncode == 0 and "limits" in out.stdout and "attention" in out.stdout


def test_info_json():
    out = cli("info", "--json", "--no-measure")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["isa"] in data["isas_supported"]


def test_info_table():
    out = cli("info", "--no-measure")
    assert out.returncode == 0, out.stderr
    assert "isa" in out.stdout and "threads" in out.stdout


def test_bench_limits_writes_valid_json(tmp_path):
    out = cli("bench", "limits", "--quick", "--budget", "0.05", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "limits.json").read_text())
    validate(data)
    assert {r["case"] for r in data["rows"]} >= {"fp32 FMA throughput"}
    assert (tmp_path / "limits.png").exists()


def test_unknown_area_is_an_argparse_error():
    out = cli("bench", "nope")
    assert out.returncode == 2 and "invalid choice" in out.stderr
