"""The MLX benchmark rows run, force evaluation and say which backend they ran on (tiny shapes,
no timing assertions)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

pytestmark = pytest.mark.mlx
require("mlx")
from fusedformer.bench import Report  # noqa: E402
from fusedformer.mlx import bench as mlx_bench  # noqa: E402

MACHINE = {"cpu": "test", "threads": 1, "isa": "generic", "limits": {"peak_gflops": 100.0, "bandwidth_gbs": 10.0}}


def test_attention_rows(rng):
    q = rng.standard_normal((1, 4, 9, 16), dtype=np.float32)
    k = rng.standard_normal((1, 2, 9, 16), dtype=np.float32)
    rows = mlx_bench.attention_rows(q, k, k, causal=True, window=4, budget_s=0.01)
    assert [r["impl"] for r in rows] == [mlx_bench.IMPL_SDPA, mlx_bench.IMPL_SDPA_NATIVE, mlx_bench.IMPL_MX_FAST_SDPA]
    rep = Report("attention", machine=MACHINE)
    for row in rows:
        assert row["timing"].runs >= 5 and "MLX" in row["note"] and "backend on" in row["note"]
        rep.add(case="tiny", flops=1e6, baseline=mlx_bench.IMPL_MX_FAST_SDPA, **row)
    assert rep.rows[0].ratio is not None


def test_qmatmul_rows(rng):
    Q = pytest.importorskip("fusedformer.quant")
    w = rng.standard_normal((16, 64), dtype=np.float32)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    for scheme in (Q.Affine(4, 32), Q.Int8(), Q.Prune(0.5)):
        row, native_row = mlx_bench.qmatmul_rows(x, Q.compress(w, scheme), budget_s=0.01)
        assert type(scheme).__name__ in row["impl"] and row["timing"].runs >= 5
        assert ("fused kernel" in row["note"]) == (not isinstance(scheme, Q.Prune))
        assert native_row["impl"].endswith("native cpu kernel")
    row = mlx_bench.mlx_quantized_matmul_row(x, w, bits=4, group_size=32, budget_s=0.01)
    assert row["impl"].startswith(mlx_bench.IMPL_MX_QMATMUL)


def test_add_rows_to_report(rng):
    Q = pytest.importorskip("fusedformer.quant")
    rep = Report("qmatmul", machine=MACHINE)
    w = rng.standard_normal((16, 64), dtype=np.float32)
    x = rng.standard_normal((1, 64), dtype=np.float32)
    mlx_bench.add_qmatmul_rows(rep, case="c", x=x, qws={"int8": Q.compress(w, Q.Int8())}, flops=2e3, io_bytes=260,
                               budget_s=0.01, native=True)
    assert [r.impl for r in rep.rows] == ["fusedformer mlx int8", "fusedformer mlx int8, native"]
    # (one copy, cache-warm: no ratio to a baseline timed cold, no share of the read probe)
    assert all(r.pct_bandwidth is None and r.ratio is None and "cache-warm" in r.note for r in rep.rows)
    q = rng.standard_normal((1, 2, 4, 8), dtype=np.float32)
    mlx_bench.add_attention_rows(rep, case="a", q=q, k=q, v=q, causal=True, flops=1e3,
                                 baseline=mlx_bench.IMPL_MX_FAST_SDPA, budget_s=0.01)
    assert len(rep.rows) == 5 and all("MLX" in r.note for r in rep.rows)
