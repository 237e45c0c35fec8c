"""Cold decode's time per key against its two limits, memory and compute, on 1 thread and on all.

    python benchmarks/decode_read_rate.py [--rounds N]

GQA 32/8 D128 decode in fp32 and bf16, as time per key and kv head on each thread (a unit of
work that streams one K row and one V row, 1 KiB in fp32 and 512 B in bf16, and takes
4 rows x 2 x 2 x 128 = 2048 flops: 2 and 4 flop per byte), in alternating rounds at each pool
size:

  * cold: Lk 16384 with K/V read from memory (isa_ab's cold cases), and its share of the
    streaming-read probe of `fusedformer bench attention`;
  * memory alone: the same bytes at the probe's rate (what perfect overlap would leave);
  * hot: the same K/V every call, Lk 1024 (8 / 4 MiB, in the last-level cache) less Lk 64
    (the call's fixed costs) over the 960 keys between: the kernels' compute with little
    waiting on memory;
  * FMA bound: the flops at the FMA probe's rate (the `bench limits` probe).

Where cold is near memory alone, decode is bound by bandwidth; near hot (above memory alone),
by its compute; near hot + memory alone, the two barely overlap. Says too whether the share of
the probe is lost within a thread or between threads. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from fusedformer import _C
from fusedformer.bench.harness import ReadProbe, measure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa_ab import sdpa_case  # noqa: E402

HQ, HKV, D = 32, 8, 128
COLD_LK, HOT_LK, BASE_LK = 16384, 1024, 64
DTYPES = ("float32", "bfloat16")
FMA_ITERS = 1_000_000


def shapes(lk: int) -> list[tuple[int, int, int, int]]:
    return [(1, HQ, 1, D), (1, HKV, lk, D), (1, HKV, lk, D)]


def per_key_ns(ms: float, lk: int, threads: int) -> float:
    """ns per key and kv head on each thread, from a call's ms."""
    return ms * 1e6 * threads / (HKV * lk)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    cold = {dt: sdpa_case(dt, shapes(COLD_LK), False, rng, dt, cold=True)[1] for dt in DTYPES}
    hot = {(lk, dt): sdpa_case(dt, shapes(lk), False, rng, dt)[1] for lk in (HOT_LK, BASE_LK) for dt in DTYPES}
    row_bytes = {dt: 2 * D * (4 if dt == "float32" else 2) for dt in DTYPES}  # a K row and a V row
    flops_per_key = 2 * 2 * (HQ // HKV) * D
    probe = ReadProbe.for_run(False)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GQA {HQ}/{HKV} D{D} decode, ns per key and kv head on each thread: "
                        f"medians of {args.rounds} rounds")
    for col in ("threads", "dtype", "cold (GB/s, % probe)", "memory alone", "hot", "FMA bound",
                "cold / (hot + memory)"):
        table.add_column(col, justify="right")
    full = _C.num_threads()
    try:
        for threads in sorted({1, full}):
            _C.set_num_threads(threads)
            fma_flops = _C.fma_work(1) * FMA_ITERS  # on all pool threads
            ms = {(kind, dt): [] for kind in ("cold", HOT_LK, BASE_LK) for dt in DTYPES}
            probe_gbs, fma_gflops = [], []
            for _ in range(args.rounds):
                for dt in DTYPES:
                    ms["cold", dt].append(measure(cold[dt], budget_s=0.3).median_ms)
                    for lk in (HOT_LK, BASE_LK):
                        ms[lk, dt].append(measure(hot[lk, dt], budget_s=0.2).median_ms)
                probe_gbs.append(probe.gbs(measure(probe.run, budget_s=0.3)))
                fma = measure(lambda: _C.fma_work(FMA_ITERS), budget_s=0.2)
                fma_gflops.append(fma_flops / (fma.median_ms / 1e3) / 1e9)
            p = statistics.median(probe_gbs)
            flops_per_thread = statistics.median(fma_gflops) / threads  # GFLOP/s = flop per ns
            for dt in DTYPES:
                cold_ns = per_key_ns(statistics.median(ms["cold", dt]), COLD_LK, threads)
                hot_ms = statistics.median(ms[HOT_LK, dt]) - statistics.median(ms[BASE_LK, dt])
                hot_ns = per_key_ns(hot_ms, HOT_LK - BASE_LK, threads)
                memory_ns = row_bytes[dt] * threads / p  # bytes / (GB/s) = ns
                gbs = row_bytes[dt] * threads / cold_ns
                table.add_row(str(threads), dt, f"{cold_ns:.1f} ({gbs:.1f}, {100 * gbs / p:.0f}%)",
                              f"{memory_ns:.1f}", f"{hot_ns:.1f}", f"{flops_per_key / flops_per_thread:.1f}",
                              f"{cold_ns / (hot_ns + memory_ns):.2f}")
            table.add_row(str(threads), "probes", f"read {p:.1f} GB/s", "", "",
                          f"FMA {statistics.median(fma_gflops):.0f} GFLOP/s", "", end_section=True)
    finally:
        _C.set_num_threads(full)
    Console().print(table)


if __name__ == "__main__":
    main()
