"""Shared fixtures: every kernel test runs on each ISA variant this CPU supports, on 1 thread
and on 2 (on our pool and on torch's OpenMP team); optional backends skip with their reason."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from fusedformer import _C

ISAS = list(_C.supported_isas())


@contextlib.contextmanager
def kernel_config(isa: str | None = None, threads: int | None = None, pool: str | None = None):
    """Runs the body with the given ISA variant, pool size and pool backend ('own', 'openmp',
    'auto': FUSEDFORMER_POOL), restoring all three afterwards."""
    old_isa, old_threads, old_pool = _C.isa(), _C.num_threads(), _C._pool_mode()
    try:
        if isa is not None:
            _C._set_isa(isa)
        if threads is not None:
            _C.set_num_threads(threads)
        if pool is not None:
            _C._set_pool(pool)
        yield
    finally:
        _C._set_isa(old_isa)
        if threads is not None:
            _C.set_num_threads(old_threads)
        _C._set_pool(old_pool)


@pytest.fixture(params=ISAS)
def isa(request):
    """Parametrizes a test over the ISA variants this CPU runs (generic, avx2, avx512)."""
    with kernel_config(isa=request.param):
        yield request.param


@pytest.fixture(params=[(1, "own"), (2, "own"), (2, "openmp")], ids=["1thr", "2thr", "2thr-openmp"])
def threads(request):
    """Parametrizes a test over 1 thread, 2 on our pool, and 2 on torch's OpenMP team (the
    default backend where torch is loaded; skipped without torch)."""
    n, pool = request.param
    if pool == "openmp":
        torch = pytest.importorskip("torch")
        torch.ones(1 << 16).sum()  # its OpenMP runtime loaded and its team started
    with kernel_config(threads=n, pool=pool):
        assert _C.pool_backend() == pool or n == 1
        yield n


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name (reproducible, never zeros)."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def require(module: str):
    """pytest.importorskip with the install hint in the reason."""
    from fusedformer._info import BACKENDS, backend_status

    for name, (mod, _) in BACKENDS.items():
        if mod == module or name == module:
            status = backend_status(name)
            if not status["available"]:
                pytest.skip(f"{name}: {status['reason']} ({status['install']})", allow_module_level=True)
            return pytest.importorskip(mod)
    return pytest.importorskip(module)
