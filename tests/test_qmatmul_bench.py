"""The qmatmul benchmark area runs end to end (tiny shapes; no timing assertions)."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import require


@pytest.mark.torch
def test_bench_qmatmul_shares_refer_to_the_probes_of_their_rounds(monkeypatch, tmp_path):
    """Every row timed in the rounds has its % BW of the read probe timed in the same rounds as
    the case, and its % peak of the FMA peak probe run there (torch bf16: of its own ceiling);
    ff.mlx's rows, timed apart on one weight copy, have neither a share nor a ratio; the probes
    are tabled, not plotted, and have no ratio; the slow reference loops at large M run once;
    MLX's rows say how many threads it used."""
    require("torch")
    from fusedformer.bench import harness, qmatmul

    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 8 << 20)  # a 128 MiB probe
    monkeypatch.setattr(qmatmul, "QUICK_SHAPES", [(1, 24, 128), (65, 24, 128)])
    args = argparse.Namespace(quick=True, budget=0.01, out=str(tmp_path), plot=False, rounds=2,
                              schemes="affine4,int8,palettize2,prune50-affine4")
    rep = qmatmul.run(args)
    for case in ("1x128 @ 24x128.T", "65x128 @ 24x128.T"):
        rows = {r.impl: r for r in rep.rows if r.case == case and r.runs}  # (timed: not MLX's note rows without it)
        assert {"torch fp32", "torch bf16", "torch _weight_int8pack_mm", "fusedformer affine4",
                "fusedformer prune50-affine4", harness.READ_PROBE} <= set(rows)
        read, peak = rows.pop(harness.READ_PROBE), rows.pop(harness.PEAK_PROBE)
        assert read.gbs > 0 and read.pct_bandwidth == pytest.approx(100.0, abs=0.1) and read.ratio is None
        assert peak.gflops > 0 and peak.pct_peak == pytest.approx(100.0, abs=0.1) and peak.ratio is None
        # each figure is rounded (% BW to 0.1, GB/s to 0.01): hence the tolerances
        slack = 0.05 + 100 * 0.005 / read.gbs + 1e-6
        for r in rows.values():
            if r.impl.startswith("fusedformer mlx "):  # (one copy, cache-warm: no share, no ratio)
                assert r.pct_bandwidth is None and r.ratio is None, r.impl
                continue
            assert r.pct_bandwidth == pytest.approx(100 * r.gbs / read.gbs, rel=2e-2, abs=slack), r.impl
            assert r.ratio is not None or r.impl == "torch fp32"
            if r.impl != "torch bf16":
                assert r.pct_peak == pytest.approx(100 * r.gflops / peak.gflops, rel=2e-2, abs=0.06), r.impl
        assert (rows["torch _weight_int8pack_mm"].runs == 1) == case.startswith("65x")
        bf16 = rows["torch bf16"]  # (bf16 products: the bf16 limit where the CPU has one, else the probe's)
        assert bf16.pct_peak == pytest.approx(100 * bf16.gflops / rep.peak_for("bfloat16", peak.gflops),
                                              rel=2e-2, abs=0.06)
        for r in rows.values():  # (the threads each impl kept busy; MLX's own rows say it)
            assert "cpu_per_wall" in r.extra, r.impl
            assert ("threads" in r.note) == ("mlx" in r.impl), r.impl
    assert rep.references == {harness.READ_PROBE, harness.PEAK_PROBE}
    rep.finish(tmp_path, plot=False)
    assert (tmp_path / "qmatmul.json").exists()


@pytest.mark.torch
def test_bench_qmatmul_on_given_shapes(monkeypatch, tmp_path):
    """--shape runs the given (M, N, K) instead of the built-in shapes, into qmatmul_shapes.json
    (the committed qmatmul.json stays); bad shapes are refused by name."""
    require("torch")
    from fusedformer.bench import harness, qmatmul

    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 8 << 20)
    args = argparse.Namespace(quick=False, budget=0.01, out=str(tmp_path), plot=False, rounds=1,
                              schemes="affine4", shape=["3,40,128"])
    rep = qmatmul.run(args)
    assert rep.area == "qmatmul_shapes"
    assert {r.case for r in rep.rows} == {"3x128 @ 40x128.T"}
    assert {"torch fp32", "fusedformer affine4", harness.READ_PROBE} <= {r.impl for r in rep.rows}
    rep.finish(tmp_path, plot=False)
    assert (tmp_path / "qmatmul_shapes.json").exists() and not (tmp_path / "qmatmul.json").exists()
    for spec, msg in [("1,2", r"M,N,K \(3 integers\)"), ("0,8,8", ">= 1"), ("1,x,8", r"\(3 integers\)")]:
        with pytest.raises(ValueError, match=r"^\[bench qmatmul\] --shape .*" + msg):
            qmatmul.parse_shapes([spec])


@pytest.mark.torch
def test_bench_qmatmul_names_mlx_rows_when_mlx_is_not_installed(monkeypatch, tmp_path):
    """Without MLX, each case's MLX rows (MLX's quantized_matmul and ff.mlx's per scheme) are
    rows not timed whose note says how to install it, in the table and the JSON, rather than
    missing."""
    require("torch")
    import json
    import sys

    from fusedformer.bench import harness, qmatmul
    from fusedformer.bench.report import validate

    monkeypatch.setitem(sys.modules, "mlx", None)  # (import mlx.core raises ImportError)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 8 << 20)
    args = argparse.Namespace(quick=False, budget=0.01, rounds=1, schemes="affine4", shape=["1,24,128"])
    rep = qmatmul.run(args)
    untimed = {r.impl: r for r in rep.rows if r.runs == 0}
    assert set(untimed) == {qmatmul.MLX_QMATMUL, "fusedformer mlx affine4"}
    for r in untimed.values():
        assert r.note == "not installed (pip install 'fusedformer[mlx]')" and r.median_ms is None and r.ratio is None
    assert {"torch fp32", "fusedformer affine4"} <= {r.impl for r in rep.rows if r.runs}
    written = rep.finish(tmp_path)
    data = json.loads(written["json"].read_text())
    validate(data)
    assert [r["note"] for r in data["rows"] if r["impl"] == qmatmul.MLX_QMATMUL] == [untimed[qmatmul.MLX_QMATMUL].note]
