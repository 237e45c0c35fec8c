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

    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 8 << 20)  # a 128 MiB probe
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


@pytest.mark.torch
def test_bench_attention_on_given_shapes(tmp_path):
    """--shape runs the given shapes instead of the built-in cases (few query rows as decode,
    more as prefill; Lq and Lk both named where they differ) into attention_shapes.json, so the
    committed attention.json of the built-in cases is not overwritten."""
    require("torch")
    from fusedformer.bench import attention

    args = argparse.Namespace(quick=False, budget=0.01, out=str(tmp_path), plot=False, rounds=1,
                              impl=["fusedformer", "torch sdpa"], dtype="float32", case="",
                              shape=["1,4,2,3,130,32", "1,2,2,40,40,64"], causal=True)
    with pytest.raises(ValueError, match=r"^\[bench attention\] --causal .*'1,4,2,3,130,32' needs LQ == LK"):
        attention.run(args)
    args.causal = False
    rep = attention.run(args)
    assert rep.area == "attention_shapes"
    names = {r.case for r in rep.rows}
    assert names == {"decode B1 GQA 4q/2kv Lq 3 Lk 130 D32 fp32", "prefill B1 H2 L40 D64 fp32"}
    impls = {r.case: {x.impl for x in rep.rows if x.case == r.case} for r in rep.rows}
    assert impls["decode B1 GQA 4q/2kv Lq 3 Lk 130 D32 fp32"] == {"fusedformer", "torch sdpa", attention.READ_PROBE}
    assert impls["prefill B1 H2 L40 D64 fp32"] == {"fusedformer", "torch sdpa", attention.PEAK_PROBE}
    rep.finish(tmp_path)
    assert (tmp_path / "attention_shapes.json").exists() and not (tmp_path / "attention.json").exists()


@pytest.mark.parametrize("spec, msg", [("1,2,3", r"B,HQ,HKV,LQ,LK,D \(6 integers\)"), ("1,8,3,1,64,64", "HKV must divide HQ"),
                                       ("1,8,8,0,64,64", "must be >= 1"), ("a,b,c,d,e,f", r"\(6 integers\)")])
def test_bench_attention_rejects_bad_shapes(spec, msg):
    from fusedformer.bench import attention

    with pytest.raises(ValueError, match=r"^\[bench attention\] --shape .*" + msg):
        attention.shape_cases([spec], causal=False)


def _mlx_cases(monkeypatch):
    """A case that times MLX and one that skips it on purpose (case.mlx False), tiny."""
    from fusedformer.bench import attention, harness

    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda: 8 << 20)
    monkeypatch.setattr(attention, "cases", lambda quick: [
        attention.Case("prefill", 1, 2, 2, 33, 33, 64, True, "float32", mlx=True),
        attention.Case("decode", 1, 4, 2, 1, 129, 64, False, "float32", mlx=False),
    ])
    return argparse.Namespace(quick=True, budget=0.01, rounds=1, dtype="all", case="",
                              impl=["fusedformer", "torch sdpa", "mlx sdpa", "fusedformer (mlx)"])


@pytest.mark.torch
def test_bench_attention_names_mlx_rows_when_mlx_is_not_installed(monkeypatch, tmp_path):
    """Without MLX, a case that would time it has a row not timed per MLX impl saying how to
    install it (table and JSON); a case that skips MLX on purpose has none."""
    require("torch")
    import json
    import sys

    from fusedformer.bench import attention
    from fusedformer.bench.report import validate

    args = _mlx_cases(monkeypatch)
    monkeypatch.setitem(sys.modules, "mlx", None)  # (import mlx.core raises ImportError)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    rep = attention.run(args)
    untimed = [(r.case.split()[0], r.impl, r.note) for r in rep.rows if r.runs == 0]
    note = "not installed (pip install 'fusedformer[mlx]')"
    assert untimed == [("prefill", "mlx sdpa", note), ("prefill", "fusedformer (mlx)", note)]
    assert all(r.ratio is None and r.median_ms is None for r in rep.rows if r.runs == 0)
    data = json.loads(rep.finish(tmp_path)["json"].read_text())
    validate(data)
    assert [r["impl"] for r in data["rows"] if r["note"] == note] == ["mlx sdpa", "fusedformer (mlx)"]


@pytest.mark.torch
def test_bench_attention_rows_record_the_threads_used(monkeypatch):
    """Every timed row records cpu_per_wall (process CPU time / wall time of its timed calls);
    the MLX rows' note says how many of the pool's threads MLX kept busy."""
    require("torch")
    require("mlx")
    from fusedformer.bench import attention

    rep = attention.run(_mlx_cases(monkeypatch))
    prefill = {r.impl: r for r in rep.rows if r.case.startswith("prefill")}
    assert set(prefill) == {"fusedformer", "torch sdpa", "mlx sdpa", "fusedformer (mlx)", attention.PEAK_PROBE}
    for r in prefill.values():
        assert isinstance(r.extra["cpu_per_wall"], float), r.impl
        if r.impl in attention.MLX_IMPLS:
            used = f"used ~{r.extra['cpu_per_wall']:.1f} of {rep.machine['threads']} threads"
            assert r.note == f"{attention.MLX_NOTE}; {used}", r.impl
        else:
            assert "threads" not in r.note, r.impl
