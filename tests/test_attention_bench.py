"""The attention benchmark area runs end to end (tiny shapes; no timing assertions)."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import require


@pytest.mark.torch
def test_bench_attention_shares_refer_to_the_probes_of_their_rounds(monkeypatch, tmp_path):
    """Decode rows' % BW is of the read probe timed in the same rounds, prefill rows' % peak of
    the peak probe run in them; both probes are tabled, not plotted."""
    require("torch")
    from fusedformer.bench import attention, harness

    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 8 << 20)  # a 64 MiB probe
    monkeypatch.setattr(attention, "cases", lambda quick: [
        attention.Case("prefill", 1, 2, 2, 33, 33, 64, True, "float32"),
        attention.Case("decode", 1, 4, 2, 1, 129, 64, False, "bfloat16"),
    ])
    args = argparse.Namespace(quick=True, budget=0.01, out=str(tmp_path), plot=False, rounds=2,
                              impl=["fusedformer", "torch sdpa"], dtype="all", case="")
    rep = attention.run(args)
    prefill = {r.impl: r for r in rep.rows if r.case.startswith("prefill")}
    decode = {r.impl: r for r in rep.rows if r.case.startswith("decode")}
    assert set(prefill) == {"fusedformer", "torch sdpa", attention.PEAK_PROBE}
    assert set(decode) == {"fusedformer", "torch sdpa", attention.READ_PROBE}
    read, peak = decode[attention.READ_PROBE], prefill[attention.PEAK_PROBE]
    assert read.gbs > 0 and read.pct_bandwidth == pytest.approx(100.0, abs=0.1)
    assert peak.gflops > 0 and peak.pct_peak == pytest.approx(100.0, abs=0.1)
    for impl in ("fusedformer", "torch sdpa"):  # (each figure is rounded: hence the tolerances)
        d, p = decode[impl], prefill[impl]
        assert d.pct_bandwidth == pytest.approx(100 * d.gbs / read.gbs, rel=2e-2, abs=0.06)
        assert p.pct_peak == pytest.approx(100 * p.gflops / peak.gflops, rel=2e-2, abs=0.06)
        # the other limit of each: as measured at the start of the run
        assert p.pct_bandwidth == pytest.approx(100 * p.gbs / rep.bandwidth_gbs, rel=2e-2, abs=0.06)
        assert d.pct_peak == pytest.approx(100 * d.gflops / rep.peak_for("bfloat16"), rel=2e-2, abs=0.06)
    assert decode["fusedformer"].ratio is not None and read.ratio is None and peak.ratio is None
    assert rep.references == {attention.READ_PROBE, attention.PEAK_PROBE}
    rep.finish(tmp_path)
    assert (tmp_path / "attention.json").exists() and (tmp_path / "attention.png").exists()
