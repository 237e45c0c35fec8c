"""Shared fixtures: every kernel test runs on each ISA variant this CPU supports and on 1 and
2 threads; optional backends skip with their reason."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from fusedformer import _C

ISAS = list(_C.supported_isas())


@contextlib.contextmanager
def kernel_config(isa: str | None = None, threads: int | None = None):
    """Runs the body with the given ISA variant and pool size, restoring both afterwards."""
    old_isa, old_threads = _C.isa(), _C.num_threads()
    try:
        if isa is not None:
            _C._set_isa(isa)
        if threads is not None:
            _C.set_num_threads(threads)
        yield
    finally:
        _C._set_isa(old_isa)
        if threads is not None:
            _C.set_num_threads(old_threads)


@pytest.fixture(params=ISAS)
def isa(request):
    """Parametrizes a test over the ISA variants this CPU runs (generic, avx2, avx512)."""
    with kernel_config(isa=request.param):
        yield request.param


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thr")
def threads(request):
    with kernel_config(threads=request.param):
        yield request.param


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
                pytest.skip(f"{name}: {status['reason']} ({status['install']})")
            return pytest.importorskip(mod)
    return pytest.importorskip(module)
