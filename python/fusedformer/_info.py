"""ff.info(): what this build is, what it runs on, and which optional backends are usable."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform

from fusedformer import _C

# backend -> (module to import, pip extra that installs it)
BACKENDS = {
    "torch": ("torch", "torch"),
    "mlx": ("mlx.core", "mlx"),
    "coremltools": ("coremltools", "coreml"),
    "transformers": ("transformers", "hf"),
}


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, macOS sysctl), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            import subprocess

            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def machine_limits() -> dict:
    """Measured fp32 FMA peak (GFLOP/s), bf16 dot-product peak (GFLOP/s; None where the CPU has
    no AVX512_BF16), AMX-BF16 tile peak (GFLOP/s; None where the CPU or OS has no AMX) and
    streaming-read bandwidth (GB/s) of all pool threads.

    Measured once per process (about a second) and cached.
    """
    bf16 = _C.peak_gflops_bf16_dot()
    amx = _C.peak_gflops_amx_bf16()
    return {
        "peak_gflops": round(_C.peak_gflops(), 1),
        "peak_gflops_bf16_dot": round(bf16, 1) if bf16 > 0 else None,
        "peak_gflops_amx_bf16": round(amx, 1) if amx > 0 else None,
        "bandwidth_gbs": round(_C.memory_bandwidth(), 2),
        "threads": _C.num_threads(),
    }


def installed_version(dist: str) -> str | None:
    """Version of an installed distribution, without importing it (None if absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def quiet_logger(name: str):
    """Warnings of logger `name` (and its children) held back for the block: coremltools logs
    about ten at import on Linux (no Core ML runtime, untested torch and scikit-learn versions),
    which said nothing about whether it is usable for export."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=None)
def backend_status(name: str) -> dict:
    """{'available': True, 'version': ...} or {'available': False, 'reason': ..., 'install': ...}."""
    module, extra = BACKENDS[name]
    install = f"pip install 'fusedformer[{extra}]'"
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return {"available": False, "reason": "not installed", "install": install}
    try:
        with quiet_logger(module.split(".")[0]):
            importlib.import_module(module)
    except Exception as e:  # a broken install must not break ff.info()
        return {"available": False, "reason": f"import failed: {type(e).__name__}: {e}", "install": install}
    version = installed_version(name) or getattr(importlib.import_module(module), "__version__", "unknown")
    return {"available": True, "version": version}


# Environment variables that change what fusedformer (and the peers it is measured against) do.
SETTINGS_VARIABLES = ("FUSEDFORMER_ISA", "FUSEDFORMER_NUM_THREADS", "FUSEDFORMER_SPIN_US", "FUSEDFORMER_POOL",
                      "FUSEDFORMER_OUTPUT_CACHE_MB", "FUSEDFORMER_MLX_CPU_KERNEL", "THP_MEM_ALLOC_ENABLE",
                      "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


def settings_from_environment() -> dict[str, str]:
    """The SETTINGS_VARIABLES that are set, with their values."""
    return {k: os.environ[k] for k in SETTINGS_VARIABLES if k in os.environ}


def info(*, measure: bool = True) -> dict:
    """Version, ISA in use and compiled in, threads, measured limits and optional backends.

    ``measure=False`` skips the (cached, ~0.5 s) machine-limit probes.
    """
    from fusedformer import __version__

    return {
        "version": __version__,
        "isa": _C.isa(),
        "isas_compiled": list(_C.compiled_isas()),
        "isas_supported": list(_C.supported_isas()),
        "threads": _C.num_threads(),
        "cpus_available": _C.available_cpus(),
        "cpu": cpu_model(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "env": settings_from_environment(),
        "limits": machine_limits() if measure else None,
        "backends": {name: backend_status(name) for name in BACKENDS},
    }
