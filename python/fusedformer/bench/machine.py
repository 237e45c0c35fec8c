"""What a benchmark ran on: CPU, cores, ISA, library versions, measured limits."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

from fusedformer import _C
from fusedformer._info import cpu_model, installed_version, machine_limits, settings_from_environment


def _checkout() -> Path | None:
    """The fusedformer checkout this runs from; None for an installed package (a git repository
    enclosing its environment is someone else's)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / ".git").exists() and (root / "kernels" / "cpu").is_dir() else None


def _git(*args: str) -> str | None:
    root = _checkout()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the fusedformer checkout this runs from (None outside one)."""
    return _git("rev-parse", "--short", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files of the checkout differ from its commit (None outside one), results
    aside (`bench all` writes one area's before the next starts)."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return None if status is None else bool(status)


def torch_threads() -> int | None:
    """torch's intra-op threads where torch is imported (the peers' threads), else None. Not
    imported for this: a loaded OpenMP runtime moves our kernels onto its team (FUSEDFORMER_POOL
    auto). The areas import torch after their Report is made, so `fusedformer bench` reads this
    again once the area has run."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


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
        "torch_threads": torch_threads(),
        "isa": _C.isa(),
        "isas_compiled": list(_C.compiled_isas()),
        "limits": machine_limits(),
        "versions": versions,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "environment": settings_from_environment(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
