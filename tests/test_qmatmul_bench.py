"""The qmatmul benchmark area runs end to end (tiny shapes; no timing assertions)."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import require


@pytest.mark.torch
def test_bench_qmatmul_runs(monkeypatch, tmp_path):
    require("torch")
    from fusedformer.bench import qmatmul

    monkeypatch.setattr(qmatmul, "QUICK_SHAPES", [(1, 24, 128), (65, 24, 128)])
    args = argparse.Namespace(quick=True, budget=0.01, out=str(tmp_path), plot=False,
                              schemes="affine4,int8,palettize2,prune50-affine4")
    rep = qmatmul.run(args)
    impls = {r.impl for r in rep.rows}
    assert {"torch fp32", "torch bf16", "fusedformer affine4", "fusedformer prune50-affine4"} <= impls
    assert all(r.ratio is not None for r in rep.rows if r.impl != "torch fp32")
    rep.finish(tmp_path, plot=False)
    assert (tmp_path / "qmatmul.json").exists()
