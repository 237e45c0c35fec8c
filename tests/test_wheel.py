"""`pip wheel .` builds a wheel that installs and imports in a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_round_trip(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", dist, ROOT])
    wheels = list(dist.glob("fusedformer-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:  # the license text ships with it (Apache-2.0 asks for it)
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-File: LICENSE" in metadata and "License-Expression: Apache-2.0" in metadata
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", wheels[0], "-c", ROOT / "requirements" / "constraints.txt"])
    probe = (
        "import fusedformer as ff, json; from fusedformer import _C; "
        "assert ff.__file__.startswith(%r), ff.__file__; "
        "print(json.dumps(ff.info(measure=False)))" % str(venv)
    )
    out = run([py, "-c", probe], cwd=tmp_path)  # not from the source tree
    assert '"isa"' in out.stdout
    out = run([venv / "bin" / "fusedformer", "info", "--no-measure"], cwd=tmp_path)
    assert "threads" in out.stdout
