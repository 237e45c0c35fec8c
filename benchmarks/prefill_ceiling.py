"""Causal prefill against the compute this machine attains: ours and torch's SDPA beside torch's
fp32 GEMM, on 1 thread and on all.

    python benchmarks/prefill_ceiling.py [--rounds N] [--shape B,H,L,D]

Causal B1 H32 L2048 D128 (issue 3's prefill case) in fp32 and bf16, 4 H L^2 D / 2 flops, and
torch.matmul of two fp32 [2048, 2048] matrices (MKL / oneDNN: the best GEMM on the machine), in
alternating rounds (measure_in_rounds) at each thread count: GFLOP/s of each, ours / torch's
time, and ours as a share of the GEMM's rate and of the FMA probe's peak. Prefill is bound by
compute; the GEMM's rate, not the FMA loop's, is what a blocked kernel can reach here, and
attention does its softmax on top. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import _C
from fusedformer.bench.harness import measure, measure_in_rounds

GEMM_N = 2048
FMA_ITERS = 1_000_000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shape", default="1,32,2048,128", help="B,H,L,D of the causal prefill")
    args = parser.parse_args(argv)
    b, h, length, d = (int(x) for x in args.shape.split(","))
    flops = 4 * b * h * length * length * d / 2
    g = torch.Generator().manual_seed(0)
    qkv = {dt: [torch.randn(b, h, length, d, generator=g).to(dt) for _ in range(3)] for dt in (torch.float32, torch.bfloat16)}
    a, w = (torch.randn(GEMM_N, GEMM_N, generator=g) for _ in range(2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"causal B{b} H{h} L{length} D{d} prefill against torch's fp32 GEMM ({GEMM_N}^3): "
                        f"medians of {args.rounds} alternating rounds")
    for col in ("threads", "dtype", "ours ms (GFLOP/s)", "torch ms", "ours / torch", "GEMM GFLOP/s",
                "ours / GEMM rate", "ours / FMA peak"):
        table.add_column(col, justify="right")
    full, torch_full = _C.num_threads(), torch.get_num_threads()
    try:
        for threads in sorted({1, full}):
            _C.set_num_threads(threads)
            torch.set_num_threads(threads)
            peak = _C.fma_work(1) * FMA_ITERS / (measure(lambda: _C.fma_work(FMA_ITERS), budget_s=0.3).median_ms / 1e3) / 1e9
            fns = {"gemm": (lambda: a @ w, {})}
            for dt, (q, k, v) in qkv.items():
                fns[f"ours {dt}"] = (lambda q=q, k=k, v=v: ff.sdpa(q, k, v, causal=True), {"min_runs": 3})
                fns[f"torch {dt}"] = (lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                      {"min_runs": 3})
            t = measure_in_rounds(fns, rounds=args.rounds, budget_s=2.0 * args.rounds)
            gemm = 2 * GEMM_N**3 / (t["gemm"].median_ms / 1e3) / 1e9
            for dt in qkv:
                ours, theirs = t[f"ours {dt}"].median_ms, t[f"torch {dt}"].median_ms
                rate = flops / (ours / 1e3) / 1e9
                table.add_row(str(threads), str(dt).removeprefix("torch."), f"{ours:.1f} ({rate:.1f})", f"{theirs:.1f}",
                              f"{ours / theirs:.3f}", f"{gemm:.1f}", f"{rate / gemm:.0%}", f"{rate / peak:.0%}",
                              end_section=dt == torch.bfloat16)
    finally:
        _C.set_num_threads(full)
        torch.set_num_threads(torch_full)
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
