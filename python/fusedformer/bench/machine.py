"""What a benchmark ran on: CPU, cores, ISA, library versions, measured limits."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

from fusedformer import _C
from fusedformer._info import installed_version, cpu_model, machine_limits


def git_commit() -> str | None:
    """The commit of the fusedformer checkout this runs from; None for an installed package (a
    git repository enclosing its environment is someone else's)."""
    root = Path(__file__).resolve().parents[3]
    if not ((root / ".git").exists() and (root / "kernels" / "cpu").is_dir()):
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe_machine() -> dict:
    import numpy as np

    from fusedformer import __version__

    versions = {"fusedformer": __version__, "numpy": np.__version__, "python": platform.python_version()}
    for dist in ("torch", "mlx", "coremltools", "transformers"):
        versions[dist] = installed_version(dist)
    return {
        "cpu": cpu_model(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus_available": _C.available_cpus(),
        "threads": _C.num_threads(),
        "isa": _C.isa(),
        "isas_compiled": list(_C.compiled_isas()),
        "limits": machine_limits(),
        "versions": versions,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
