"""The attention benchmark area runs end to end (tiny shapes; no timing assertions)."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import require


@pytest.mark.torch
def test_bench_attention_decode_shares_refer_to_the_read_probe_of_their_rounds(monkeypatch, tmp_path):
    require("torch")
    from fusedformer.bench import attention

    monkeypatch.setattr(attention, "cases", lambda quick: [
        attention.Case("prefill", 1, 2, 2, 33, 33, 64, True, "float32"),
        attention.Case("decode", 1, 4, 2, 1, 129, 64, False, "bfloat16"),
    ])
    args = argparse.Namespace(quick=True, budget=0.01, out=str(tmp_path), plot=False, rounds=2,
                              impl=["fusedformer", "torch sdpa"], dtype="all", case="")
    rep = attention.run(args)
    prefill = [r for r in rep.rows if r.case.startswith("prefill")]
    decode = {r.impl: r for r in rep.rows if r.case.startswith("decode")}
    assert {r.impl for r in prefill} == {"fusedformer", "torch sdpa"}  # no probe: compute-bound
    assert set(decode) == {"fusedformer", "torch sdpa", attention.READ_PROBE}
    probe = decode[attention.READ_PROBE]
    assert probe.gbs > 0 and probe.pct_bandwidth == pytest.approx(100.0, abs=0.1)
    ours = decode["fusedformer"]
    assert ours.pct_bandwidth == pytest.approx(100 * ours.gbs / probe.gbs, rel=1e-2)
    assert ours.ratio is not None and probe.ratio is None
    for r in prefill:  # the machine's bandwidth, measured at the start of the run
        assert r.pct_bandwidth == pytest.approx(100 * r.gbs / rep.bandwidth_gbs, rel=1e-2)
    assert attention.READ_PROBE in rep.references  # tabled, not plotted
    rep.finish(tmp_path)
    assert (tmp_path / "attention.json").exists() and (tmp_path / "attention.png").exists()
