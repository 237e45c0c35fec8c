"""GQA decode's compute alone: time per key with K/V in cache, on 1 thread and on all.

    python benchmarks/decode_hot.py [--rounds N] [--dtype bfloat16|float32|float16]

GQA 32/8 D128 decode over the same K/V every call, Lk 128-2048, each less Lk 64 (the call's
fixed costs), as ns per key and kv head on each thread (4 rows x 2 x 2 x 128 = 2048 flops per
key). Unlike decode_read_rate.py's hot column, nothing between the calls flushes the caches, so
this is the kernels' compute with no memory waits: where it is as long per key on 2 threads as
on 1, the pool adds no per-thread cost, and 512 B (bf16) per key over it is the bandwidth the
kernels could reach if memory were hidden entirely. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from fusedformer import _C
from fusedformer.bench.harness import measure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa_ab import sdpa_case  # noqa: E402

HQ, HKV, D = 32, 8, 128
BASE_LK, LKS = 64, (128, 256, 512, 1024, 2048)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    calls = {lk: sdpa_case(args.dtype, [(1, HQ, 1, D), (1, HKV, lk, D), (1, HKV, lk, D)], False, rng, args.dtype)[1]
             for lk in (BASE_LK, *LKS)}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GQA {HQ}/{HKV} D{D} {args.dtype} decode, K/V in cache: ns per key and kv head on each "
                        f"thread (Lk less Lk {BASE_LK}), medians of {args.rounds} rounds")
    table.add_column("threads", justify="right")
    for lk in LKS:
        table.add_column(f"Lk {lk}", justify="right")
    full = _C.num_threads()
    try:
        for threads in sorted({1, full}):
            _C.set_num_threads(threads)
            ms = {lk: [] for lk in calls}
            for _ in range(args.rounds):
                for lk, call in calls.items():
                    ms[lk].append(measure(call, budget_s=0.15).median_ms)
            base = statistics.median(ms[BASE_LK])
            table.add_row(str(threads), *(f"{(statistics.median(ms[lk]) - base) * 1e6 * threads / (HKV * (lk - BASE_LK)):.1f}"
                                          for lk in LKS))
    finally:
        _C.set_num_threads(full)
    Console().print(table)


if __name__ == "__main__":
    main()
