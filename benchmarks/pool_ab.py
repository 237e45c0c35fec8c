"""Our thread pool against torch's OpenMP team (FUSEDFORMER_POOL own vs openmp), side by side.

Both backends alternate in one process (`_C._set_pool`), round after round, and each case's
time is the median over the rounds, so a noisy machine moves both alike. `--between torch`
runs a MiniLM-sized torch matmul before every timed call, as a model does: that is where torch's
spinning team and our pool's workers compete for cores. Run it once as is and once with
OMP_WAIT_POLICY=PASSIVE set (before torch loads) to see both sides of FUSEDFORMER_POOL=auto's
rule.

    python benchmarks/pool_ab.py [--between none|torch] [--rounds N] [--case TEXT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from fusedformer import _C
from fusedformer.quant import Affine

from isa_ab import padded_mask, qmatmul_case, sdpa_case

POOLS = ("own", "openmp")


def cases(rng) -> list:
    return [
        qmatmul_case(Affine(4, 64), 4096, 4096, rng),
        sdpa_case("sdpa decode GQA 32/8 Lk 4096 D128", [(1, 32, 1, 128), (1, 8, 4096, 128), (1, 8, 4096, 128)],
                  False, rng),
        sdpa_case("sdpa MiniLM B16 H12 L23 D32 bool mask", [(16, 12, 23, 32)] * 3, False, rng,
                  mask=padded_mask(16, 23, 23, 5, causal=False)),
        sdpa_case("sdpa prefill causal B1 H8 L1024 D128", [(1, 8, 1024, 128)] * 3, True, rng),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--between", choices=("none", "torch"), default="torch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per case, pool and round")
    parser.add_argument("--case", default="", help="only cases whose name contains this text")
    args = parser.parse_args(argv)
    a, b = torch.randn(368, 384), torch.randn(384, 1536)
    torch.mm(a, b)  # torch's OpenMP runtime loaded and its team started
    chosen = [(n, f) for n, f in cases(np.random.default_rng(0)) if args.case in n]
    for _, fn in chosen:  # untimed: the first call compresses the weight and builds the cold copies
        fn()
    before = _C._pool_mode()
    samples = {(n, pool): [] for n, _ in chosen for pool in POOLS}
    try:
        for _ in range(args.rounds):
            for pool in POOLS:
                _C._set_pool(pool)
                for name, fn in chosen:
                    times = []
                    for _ in range(args.calls):
                        if args.between == "torch":
                            torch.mm(a, b)
                        t = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - t)
                    samples[(name, pool)].append(statistics.median(times))
    finally:
        _C._set_pool(before)
    from rich.console import Console
    from rich.table import Table

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    table = Table(title=f"own pool vs OpenMP team, median of {args.rounds} rounds, torch ops between calls: "
                        f"{args.between}, OMP_WAIT_POLICY {policy}, {_C.num_threads()} threads")
    for col in ("case", "own ms", "openmp ms", "openmp / own"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, _ in chosen:
        own, team = (statistics.median(samples[(name, pool)]) * 1e3 for pool in POOLS)
        table.add_row(name, f"{own:.3f}", f"{team:.3f}", f"{team / own:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
