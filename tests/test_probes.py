"""Machine-limit probes return plausible numbers; the fixed-work probes do the work they claim."""

from __future__ import annotations

import numpy as np
import pytest

from fusedformer import _C


def test_peak_gflops_plausible():
    g = _C.peak_gflops(seconds=0.05)
    # one scalar core manages ~1 GFLOP/s; no CPU this runs on does 100 TFLOP/s fp32
    assert 0.5 < g < 1e5


def test_memory_bandwidth_plausible():
    bw = _C.memory_bandwidth(mib=64, passes=2)
    assert 0.2 < bw < 1e4


def test_fma_work_counts_flops():
    per_iter = _C.fma_work(1)
    width = 16 if "avx512" in _C.supported_isas() else 8  # the widest FMA the CPU runs
    assert per_iter == _C.num_threads() * 12 * width * 2
    assert _C.fma_work(1000) == 1000 * per_iter


def test_stream_sum_matches_numpy(rng):
    for n in (1, 7, 31, 33, 65537, 200003):
        x = rng.standard_normal(n).astype(np.float32)
        assert _C.stream_sum(x) == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-4, abs=1e-3)


def test_bf16_dot_peak_where_the_cpu_has_it():
    g = _C.peak_gflops_bf16_dot(seconds=0.05)
    if "avx512_bf16" in _C.supported_isas():
        assert 0.5 < g < 1e5
    else:
        assert g == 0.0


def test_amx_bf16_peak_where_the_cpu_has_it():
    g = _C.peak_gflops_amx_bf16(seconds=0.05)
    if "avx512_amx" in _C.supported_isas():
        # the tiles do 8192 multiply-adds an instruction: well above the vdpbf16ps rate
        assert _C.peak_gflops_bf16_dot(seconds=0.05) < g < 1e6
    else:
        assert g == 0.0


@pytest.mark.parametrize("probe", ["peak_gflops", "peak_gflops_bf16_dot", "peak_gflops_amx_bf16"])
@pytest.mark.parametrize("bad", [dict(seconds=0.0), dict(seconds=-1.0), dict(seconds=1e9)])
def test_peak_rejects_bad_duration(probe, bad):
    with pytest.raises(ValueError, match=rf"\[{probe}\]"):
        getattr(_C, probe)(**bad)


def test_bandwidth_rejects_bad_size():
    with pytest.raises(ValueError, match=r"\[memory_bandwidth\]"):
        _C.memory_bandwidth(mib=0)
    for mib in (2**31, 2**44, 2**50):  # (mib << 20 wrapped past int64 to an empty buffer: 0 GB/s)
        with pytest.raises(ValueError, match=r"\[memory_bandwidth\] mib must be at most 2\^30"):
            _C.memory_bandwidth(mib=mib)
